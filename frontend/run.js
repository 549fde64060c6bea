// Starting runs, asking follow-ups, showing runs again (after a refresh, from the history) and stopping them:
// the requests, and what the page says when they do not go as planned.

import { ApiError, apiFetch, currentToken, refusalDetail, unreachable } from "./api.js";
import { rememberedPrompt, showInAddress } from "./address.js";
import { ConnectionLost, NeverFinished, cancelRun, followRun, showEvent } from "./follow.js";
import { formatBytes, plural } from "./format.js";
import { loadHistory, showRunActions } from "./history.js";
import { beginTurn, hideBanner, renderElapsed, resetRun, setStatus, showBanner } from "./render.js";
import { $, state } from "./state.js";

/** What a 401 means for the user: no token yet, or the one saved is wrong. */
export function tokenProblem() {
  return currentToken()
    ? "Wrong token: the server refused the token saved for it. Enter the right one under Settings, Token."
    : "This server needs a token: open Settings and enter it in the Token field.";
}

const SESSION_ENDED = "Follow-up questions are not possible here: the server no longer keeps this conversation's " +
  "REPL (it was left idle too long, was ended to make room for others, or the server restarted). To ask more, " +
  "run the task again with its input (Run, above), then ask your follow-up.";
const SESSION_BUSY = "Another question of this conversation is still running (in another tab or client). Wait " +
  "for it to end, or stop it there, then ask again.";

/** The limits the user lowered under Settings. */
function limitSettings() {
  const settings = {};
  const limits = state.config?.limits || {};
  const fields = [["max-iterations", "max_iterations", limits.max_iterations],
    ["max-subcalls", "max_subcalls", limits.max_subcalls], ["exec-timeout", "exec_timeout_s", limits.exec_timeout_s]];
  for (const [id, key, serverValue] of fields) {
    const raw = $(id).value.trim();
    if (raw !== "" && Number(raw) !== Number(serverValue)) settings[key] = Number(raw);
  }
  return settings;
}

/**
 * A new task. Detached, so a refresh or a dropped connection does not cancel it; a session, so the answer can
 * take follow-up questions on the same REPL (the page's main use after a long exploration of a large input).
 */
function buildRequest(prompt) {
  const settings = { ...limitSettings(), detach: true, session: true };
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

function goneText(runId) {
  return state.config?.history
    ? `Run ${runId} is not on this server: it was deleted from the history, or the link came from another server.`
    : `Run ${runId} is no longer on this server. This server keeps no history (RLM_HISTORY_DB=off), so a run ` +
      "can be shown again only for a few minutes after it ends, and not after the server restarts. Run the task " +
      "again to get its answer.";
}

/** Why following a run stopped short, in words. */
function explain(error) {
  if (error.name === "AbortError") {
    setStatus("Stopped before the run started: nothing reached the model.", "failed");
    return;
  }
  let text;
  if (error instanceof ApiError) {
    if (error.status === 404) {
      text = goneText(state.runId);
      showInAddress([]);
    } else {
      text = error.status === 401 ? tokenProblem() : `The server refused to show the run (${error.status}): ${error.message}`;
    }
  } else if (error instanceof NeverFinished) {
    text = `Run ${state.runId} never finished: the server stopped while it ran, and has nothing more of it.`;
  } else if (error instanceof ConnectionLost) {
    text = error.message;
  } else {
    text = unreachable(error);
  }
  showBanner(text, { error: true, kind: "run" });
  setStatus(text, "failed");
}

function setBusy(busy) {
  state.busy = busy;
  $("run-button").disabled = busy;
  $("stop-button").disabled = !busy;
  $("follow-up-button").disabled = busy;
  if (busy) $("follow-up").hidden = true;
  clearInterval(state.timer);
  if (busy) {
    state.timer = setInterval(() => {
      if (!state.terminal && state.startedAt) renderElapsed(Date.now() - state.startedAt);
    }, 100);
  }
}

/** A run (or none) has stopped being followed: offer what can be done with it now. */
function settled() {
  setBusy(false);
  const turn = state.turns.at(-1);
  if (state.runId) showRunActions(state.runId, Boolean(turn?.inputKept));
  offerFollowUp();
  loadHistory();
}

/** POST /process and follow the run it starts; `accepted()` runs once the server took the request. */
async function send(body, headers, { starting, accepted = () => {}, refusal = refused }) {
  const upload = new AbortController();
  state.upload = upload;
  setBusy(true);
  setStatus(starting, "running");
  try {
    const response = await apiFetch("/process", { method: "POST", body, headers, signal: upload.signal });
    state.upload = null;
    if (!response.ok) {
      refusal(response.status, await refusalDetail(response));
      return;
    }
    accepted();
    await followRun(response);
  } catch (error) {
    explain(error);
  } finally {
    state.upload = null;
    settled();
  }
}

export async function startRun() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    setStatus("Write a prompt first: what should be done with the input?", "failed");
    $("prompt").focus();
    return;
  }
  if (state.busy || emptyInputWarning()) return;
  state.emptyInputAccepted = false;
  if (state.ownSession) {  // starting over: the conversation this page began gives its REPL back
    apiFetch(`/api/sessions/${encodeURIComponent(state.ownSession)}`, { method: "DELETE" }).catch(() => {});
    state.ownSession = null;
  }
  hideBanner("run");
  resetRun();
  showRunActions(null);
  showInAddress([]);
  beginTurn(prompt);
  state.turns[0].inputKept = $("keep-input").checked;
  state.startedAt = Date.now();
  const { body, headers } = buildRequest(prompt);
  const starting = state.file ? `Uploading ${state.file.name} (${formatBytes(state.file.size)})…` : "Starting…";
  await send(body, headers, { starting });
  if (state.turns.length === 1 && state.sessionId) state.ownSession = state.sessionId;
}

/** A follow-up question on the session of the answer shown: prompt only, the REPL keeps the input. */
export async function askFollowUp() {
  const prompt = $("follow-up-prompt").value;
  if (state.busy || !state.sessionId) return;
  if (!prompt.trim()) {
    setStatus("Write the follow-up question first.", "failed");
    $("follow-up-prompt").focus();
    return;
  }
  hideBanner("run");
  const body = JSON.stringify({ prompt, session_id: state.sessionId, settings: { ...limitSettings(), detach: true } });
  await send(body, { "Content-Type": "application/json" }, {
    starting: "Asking…",
    accepted: () => {
      beginTurn(prompt);
      state.startedAt = Date.now();
      $("follow-up-prompt").value = "";
    },
    refusal: (status, detail) => {  // the box under the answer says the same, once offerFollowUp has asked
      if (status === 404) setStatus(SESSION_ENDED, "failed");
      else if (status === 409) setStatus(SESSION_BUSY, "failed");
      else refused(status, detail);
    },
  });
}

/** Under an answer that belongs to a session: the follow-up box, or why the conversation cannot go on. */
export async function offerFollowUp() {
  const box = $("follow-up");
  const sessionId = state.sessionId;
  if (!sessionId || !state.terminal || state.busy) {
    box.hidden = true;
    return;
  }
  let session = null;
  let gone = false;
  try {
    const response = await apiFetch(`/api/sessions/${encodeURIComponent(sessionId)}`);
    gone = response.status === 404;
    if (response.ok) session = await response.json();
  } catch { /* not reachable now: asking will say what is wrong */ }
  if (sessionId !== state.sessionId || !state.terminal || state.busy) return;  // the page moved on meanwhile
  // A lone run without an answer whose REPL is gone (it failed before its REPL started) has nothing to go on from.
  box.hidden = gone && state.turns.length === 1 && !state.answer;
  $("follow-up-button").disabled = gone;  // the question typed stays, to ask again after starting over
  const note = $("follow-up-note");
  note.className = gone || session?.live_run ? "note" : "muted small";
  if (gone) note.textContent = SESSION_ENDED;
  else if (session?.live_run) note.textContent = SESSION_BUSY;
  else if (session) {
    const until = new Date(session.expires_at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    note.textContent = "The question runs on the same REPL: the input and every variable so far are still there. " +
      `Left idle, the conversation ends at ${until}; Run (above) starts over and ends it.`;
  } else note.textContent = "";
}

/** The run shown has a stored record (with its prompt and events) when the server keeps history. */
async function storedRun(runId) {
  if (!state.config?.history) return null;
  const response = await apiFetch(`/api/runs/${encodeURIComponent(runId)}`);
  if (response.status === 404) return null;  // not in the history (yet): its events route may still have it
  if (!response.ok) throw new ApiError(response.status, await refusalDetail(response));
  const { run, events } = await response.json();
  return { ...run, events };
}

/**
 * Show these runs as one conversation, oldest first (a refresh, a link, the history): what happened is
 * replayed, and a run still going is followed live.
 */
export async function showRuns(runIds) {
  if (state.busy) {
    setStatus("A run is in progress: wait for it, or stop it, before opening another.", "warn");
    return;
  }
  hideBanner("run");
  resetRun();
  showRunActions(null);
  showInAddress(runIds);
  setBusy(true);
  let record = null;
  let replayed = false;
  try {
    for (const [index, runId] of runIds.entries()) {
      record = await storedRun(runId);
      const prompt = record?.prompt ?? rememberedPrompt(runId) ?? "";
      if (index === 0 && prompt) $("prompt").value = prompt;
      beginTurn(prompt);
      Object.assign(state.turns.at(-1), { runId, inputKept: Boolean(record?.input_kept) });
      state.runId = runId;
      for (const event of record?.events || []) showEvent(event.type, event, event.seq);
      replayed = state.terminal;
      if (!state.terminal) await followRun();
    }
    if (replayed && record?.status === "finished") {
      setStatus(runIds.length > 1 ? `Replayed a conversation of ${plural(runIds.length, "question")}.`
        : `Replayed run ${state.runId}.`, "done");
    }
  } catch (error) {
    explain(error);
  } finally {
    settled();
  }
}

export function stopRun() {
  if (state.upload && !state.runId) {  // still sending the request: no run yet
    state.stopRequested = true;
    state.upload.abort();
    return;
  }
  cancelRun();
}
