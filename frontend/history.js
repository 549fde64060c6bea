// Past runs: the list, replaying one, and what can be done with the run shown (export, delete, its input).

import { api } from "./api.js";
import { handleEvent, hideBanner, resetRun, setStatus, showBanner } from "./render.js";
import { $, el, state } from "./state.js";

const TAGS = { finished: "finished", failed: "failed", unfinished: "unfinished", cancelled: "cancelled",
  running: "running" };

function statusTag(run) {
  if (run.status === "finished" && !run.ready) return el("span", "status-tag not-ready", "not ready");
  return el("span", `status-tag ${TAGS[run.status] || ""}`.trim(), run.status);
}

function markCurrent() {
  for (const button of $("history").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.runId === state.runId));
  }
}

function renderHistory(runs, append) {
  const list = $("history");
  if (!append) list.replaceChildren();
  for (const run of runs) {
    const item = el("li");
    const button = el("button");
    button.type = "button";
    button.dataset.runId = run.id;
    const preview = run.prompt_preview || "";  // the list carries previews; openRun loads the whole run
    const when = el("span", "when", new Date(run.created * 1000).toLocaleString());
    when.append(statusTag(run));
    button.append(el("span", "what", preview.trim() || "(no prompt)"), when);
    button.addEventListener("click", () => openRun(run.id));
    item.append(button);
    list.append(item);
  }
  $("history-empty").hidden = list.children.length > 0;
  markCurrent();
}

export async function loadHistory(append = false) {
  if (!state.config?.history) {
    $("history-empty").hidden = false;
    $("history-empty").textContent = state.config ? "History is off on this server (RLM_HISTORY_DB)."
      : "Past runs appear here.";
    $("history-more").hidden = true;
    return;
  }
  try {
    const query = append && state.historyBefore ? `?before=${state.historyBefore}` : "";
    const page = await (await api(`/api/runs${query}`)).json();
    state.historyBefore = page.next_before;
    renderHistory(page.runs, append);
    $("history-more").hidden = !page.next_before;
  } catch (error) {
    $("history-empty").hidden = false;
    $("history-empty").textContent = `History unavailable: ${error.message}`;
  }
}

/** Replay a stored run through the same render code as a live one. */
export async function openRun(runId) {
  if (state.controller) return;
  try {
    const { run, events } = await (await api(`/api/runs/${encodeURIComponent(runId)}`)).json();
    hideBanner("run");
    resetRun();
    for (const event of events) handleEvent({ event: event.type, data: event });
    if (!state.terminal) setStatus(`This run is ${run.status}: it never finished.`, "failed");
    else if (run.status === "finished") setStatus(`Replayed run ${run.id}.`, "done");
    $("prompt").value = run.prompt;
    showRunActions(run.id, Boolean(run.input_kept));
  } catch (error) {
    showBanner(`Could not open the run: ${error.message}`, { error: true, kind: "run" });
  }
}

/** Offer Export, Delete and (when kept) the input of the run shown; `runId` null hides them. */
export function showRunActions(runId, inputKept = false) {
  const stored = Boolean(runId && state.config?.history);
  state.runId = runId;
  state.inputKept = stored && inputKept;
  for (const id of ["export-json", "export-md", "delete-run"]) $(id).hidden = !stored;
  $("download-input").hidden = !state.inputKept;
  markCurrent();
}

export function downloadBlob(blob, filename) {
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function exportRun(format) {
  const response = await api(`/api/runs/${encodeURIComponent(state.runId)}/export?format=${format}`);
  downloadBlob(await response.blob(), `rlm-run-${state.runId}.${format}`);
}

async function downloadInput() {
  const response = await api(`/api/runs/${encodeURIComponent(state.runId)}/input`);
  downloadBlob(await response.blob(), `rlm-input-${state.runId}.txt`);
}

async function deleteRun() {
  if (!state.runId || !confirm("Delete this run from the history?")) return;
  await api(`/api/runs/${encodeURIComponent(state.runId)}`, { method: "DELETE" });
  resetRun();
  showRunActions(null);
  setStatus("Run deleted.", "done");
  await loadHistory();
}

export function wireHistory() {
  const failed = (error) => showBanner(error.message, { error: true, kind: "run" });
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  $("export-json").addEventListener("click", () => exportRun("json").catch(failed));
  $("export-md").addEventListener("click", () => exportRun("md").catch(failed));
  $("download-input").addEventListener("click", () => downloadInput().catch(failed));
  $("delete-run").addEventListener("click", () => deleteRun().catch(failed));
}
