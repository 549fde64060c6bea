// Past runs: the list (a session's runs as one conversation), and what can be done with the run shown
// (export, delete, its input). Opening an entry is the caller's (wireHistory's `open`).

import { api } from "./api.js";
import { showInAddress } from "./address.js";
import { plural } from "./format.js";
import { resetRun, setStatus, showBanner } from "./render.js";
import { $, el, state } from "./state.js";

const TAGS = { finished: "finished", failed: "failed", unfinished: "unfinished", cancelled: "cancelled",
  lost: "lost", running: "running" };

let openRuns = () => {};

function statusTag(run) {
  if (run.status === "finished" && !run.ready) return el("span", "status-tag not-ready", "not ready");
  return el("span", `status-tag ${TAGS[run.status] || ""}`.trim(), run.status);
}

function markCurrent() {
  for (const button of $("history").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.runIds.split(",").includes(state.runId)));
  }
}

/** One entry: a run, or a conversation (its runs oldest first), named by its first question. */
function drawEntry(entry) {
  const first = entry.runs[0];
  const last = entry.runs.at(-1);
  const button = el("button");
  button.type = "button";
  button.dataset.runIds = entry.runs.map((run) => run.id).join(",");
  const preview = first.prompt_preview || "";  // the list carries previews; opening loads the whole runs
  const when = el("span", "when", new Date(last.created * 1000).toLocaleString());
  if (entry.runs.length > 1) when.append(el("span", "questions", ` · ${plural(entry.runs.length, "question")}`));
  when.append(statusTag(last));
  button.append(el("span", "what", preview.trim() || "(no prompt)"), when);
  button.addEventListener("click", () => openRuns(entry.runs.map((run) => run.id)));
  entry.item.replaceChildren(button);
}

function renderHistory(runs, append) {
  const list = $("history");
  if (!append) {
    list.replaceChildren();
    state.historyGroups = new Map();
  }
  for (const run of runs) {  // newest first: a conversation is listed where its latest question is
    const known = run.session_id ? state.historyGroups.get(run.session_id) : null;
    if (known) {
      known.runs.unshift(run);
      drawEntry(known);
      continue;
    }
    const entry = { runs: [run], item: el("li") };
    if (run.session_id) state.historyGroups.set(run.session_id, entry);
    drawEntry(entry);
    list.append(entry.item);
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
    const cursor = append && state.historyBefore;
    const query = cursor ? `?${new URLSearchParams({ before: cursor.before, before_id: cursor.id })}` : "";
    const page = await (await api(`/api/runs${query}`)).json();
    // both: a page cut by `before` alone skips the runs created at the same time as the last one shown
    state.historyBefore = page.next_before == null ? null : { before: page.next_before, id: page.next_before_id };
    renderHistory(page.runs, append);
    $("history-more").hidden = !page.next_before;
  } catch (error) {
    $("history-empty").hidden = false;
    $("history-empty").textContent = `History unavailable: ${error.message}`;
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
  showInAddress([]);
  setStatus("Run deleted.", "done");
  await loadHistory();
}

/** Wire the history panel; `open(runIds)` shows an entry's runs, oldest first. */
export function wireHistory(open) {
  openRuns = open;
  const failed = (error) => showBanner(error.message, { error: true, kind: "run" });
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  $("export-json").addEventListener("click", () => exportRun("json").catch(failed));
  $("export-md").addEventListener("click", () => exportRun("md").catch(failed));
  $("download-input").addEventListener("click", () => downloadInput().catch(failed));
  $("delete-run").addEventListener("click", () => deleteRun().catch(failed));
}
