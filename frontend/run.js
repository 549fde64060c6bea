// Starting and stopping a run: build the request, stream its events into the page.

import { apiFetch, currentToken, refusalDetail, unreachable } from "./api.js";
import { formatBytes } from "./format.js";
import { loadHistory, showRunActions } from "./history.js";
import { handleEvent, hideBanner, renderElapsed, resetRun, setStatus, showBanner } from "./render.js";
import { readSse } from "./sse.js";
import { $, state } from "./state.js";

/** What a 401 means for the user: no token yet, or the one saved is wrong. */
export function tokenProblem() {
  return currentToken()
    ? "Wrong token: the server refused the token saved for it. Enter the right one under Settings, Token."
    : "This server needs a token: open Settings and enter it in the Token field.";
}

function buildRequest(prompt) {
  const settings = {};
  const limits = state.config?.limits || {};
  const fields = [["max-iterations", "max_iterations", limits.max_iterations],
    ["max-subcalls", "max_subcalls", limits.max_subcalls], ["exec-timeout", "exec_timeout_s", limits.exec_timeout_s]];
  for (const [id, key, serverValue] of fields) {
    const raw = $(id).value.trim();
    if (raw !== "" && Number(raw) !== Number(serverValue)) settings[key] = Number(raw);
  }
  if ($("keep-input").checked) settings.keep_input = true;
  if (state.file) {
    const form = new FormData();
    form.append("prompt", prompt);
    form.append("settings", JSON.stringify(settings));
    form.append("input_file", state.file, state.file.name);
    return { body: form, headers: {} };
  }
  return {
    body: JSON.stringify({ prompt, input_data: $("input-text").value, settings }),
    headers: { "Content-Type": "application/json" },
  };
}

/** An empty input is allowed, but only after the user saw a warning and pressed Run again. */
function emptyInputWarning() {
  const empty = state.file ? state.file.size === 0 : $("input-text").value === "";
  if (!empty || state.emptyInputAccepted) return false;
  state.emptyInputAccepted = true;
  const what = state.file ? `The file ${state.file.name} is empty (0 bytes)` : "The input is empty";
  setStatus(`${what}: the model would have nothing to read. Add text or a file, or press Run again to run ` +
    "without input.", "warn");
  return true;
}

function refused(status, detail) {
  const reason = status === 401 ? tokenProblem() : detail;
  showBanner(`The server refused the run (${status}): ${reason}`, { error: true, kind: status === 401 ? "auth" : "run" });
  setStatus(`Refused (${status}): ${reason}`, "failed");
  if (status === 401) $("settings").open = true;
}

export async function startRun() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    setStatus("Write a prompt first: what should be done with the input?", "failed");
    $("prompt").focus();
    return;
  }
  if (state.controller || emptyInputWarning()) return;
  state.emptyInputAccepted = false;
  hideBanner("run");
  resetRun();
  showRunActions(null);
  const controller = new AbortController();
  state.controller = controller;
  $("run-button").disabled = true;
  $("stop-button").disabled = false;
  setStatus(state.file ? `Uploading ${state.file.name} (${formatBytes(state.file.size)})…` : "Starting…", "running");
  state.startedAt = performance.now();
  state.timer = setInterval(() => {
    if (!state.terminal) renderElapsed(performance.now() - state.startedAt);
  }, 100);
  try {
    const { body, headers } = buildRequest(prompt);
    const response = await apiFetch("/process", { method: "POST", body, headers, signal: controller.signal });
    if (!response.ok) {
      refused(response.status, await refusalDetail(response));
      return;
    }
    await readSse(response, handleEvent);
    if (!state.terminal) {
      showBanner("The connection closed before the run finished.", { error: true, kind: "run" });
      setStatus("Interrupted: the connection closed before the run finished.", "failed");
    }
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Stopped. The server cancelled the run.", "failed");
    } else {
      const text = unreachable(error);
      showBanner(text, { error: true, kind: "run" });
      setStatus(text, "failed");
    }
  } finally {
    clearInterval(state.timer);
    state.controller = null;
    $("run-button").disabled = false;
    $("stop-button").disabled = true;
    if (state.runId) showRunActions(state.runId, $("keep-input").checked);
    loadHistory();
  }
}

export function stopRun() {
  if (state.controller) state.controller.abort();
}
