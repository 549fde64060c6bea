// Following the run shown on the server: its events into the page as they come, re-attaching after a dropped
// connection, and cancelling it.
//
// Runs started by the page are detached: the run goes on when the page's connection closes (a refresh, a
// laptop asleep, a proxy that drops long requests). Every event carries its number (the SSE `id:`); the page
// keeps the last one it drew and re-attaches with `GET /api/runs/{id}/events` and `Last-Event-ID`, so the
// server sends every later event exactly once: no gap, no duplicate.

import { ApiError, apiFetch, refusalDetail } from "./api.js";
import { rememberPrompt, showInAddress } from "./address.js";
import { handleEvent, setStatus } from "./render.js";
import { readSse } from "./sse.js";
import { state } from "./state.js";

/** Waits before each attempt to re-attach that brought nothing new (about half a minute in all). */
const RETRY_MS = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];

/** The server has no more of a run that never ended (its process stopped while it ran). */
export class NeverFinished extends Error {}

/** The connection to the server is lost for good (the run may still go on there). */
export class ConnectionLost extends Error {}

/** One event of the run shown, live or replayed: drawn, and its number kept for re-attaching. */
export function showEvent(type, data, seq) {
  state.lastSeq = Number(seq) || state.lastSeq;
  handleEvent({ event: type, data });
  if (type === "start") started(data);
}

/** The run has a name now: the address and the conversation learn it; a Stop pressed before takes effect. */
function started(data) {
  const turn = state.turns.at(-1);
  if (turn && !turn.runId) {
    turn.runId = data.run_id;
    if (turn.prompt) rememberPrompt(data.run_id, turn.prompt);
  }
  showInAddress(state.turns.map((t) => t.runId).filter(Boolean));
  if (!state.startedAt) state.startedAt = Math.min(Date.now(), data.ts * 1000);  // re-attached: its own start
  if (state.stopRequested && !state.terminal) cancelRun();
}

async function attach(runId, after) {
  const headers = after ? { "Last-Event-ID": String(after) } : {};
  const response = await apiFetch(`/api/runs/${encodeURIComponent(runId)}/events`, { headers });
  if (response.status >= 500) throw new Error(`HTTP ${response.status}`);  // a proxy or a restart: try again
  if (!response.ok) throw new ApiError(response.status, await refusalDetail(response));
  return response;
}

const pause = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/**
 * Follow the run shown to its terminal event: read `response` (its `/process` stream) if given, else attach
 * after the last event drawn; when a connection drops, attach again from there. Throws `ApiError` when the
 * server refuses (404: it no longer has the run), `NeverFinished`, `ConnectionLost`, or an `AbortError`.
 */
export async function followRun(response = null) {
  let misses = 0;
  let source = response;
  for (let pass = 0; ; pass += 1) {
    const attached = source === null;
    const before = state.lastSeq;
    let closedByServer = false;
    try {
      if (attached) {
        source = await attach(state.runId, state.lastSeq);
        if (pass) setStatus(`Re-attached to run ${state.runId}; following it.`, "running");
      }
      await readSse(source, (evt) => showEvent(evt.event, evt.data, evt.id || evt.data?.seq));
      closedByServer = true;
    } catch (error) {
      if (error.name === "AbortError" || error instanceof ApiError) throw error;
      // a dropped connection (a network error while reading or connecting): attach again below
    }
    source = null;
    if (state.terminal) return;
    if (!state.runId) throw new ConnectionLost("The connection closed before the run started.");
    const progressed = state.lastSeq > before;
    // The events route closes a stream only at the terminal event, or when it has nothing more of a run
    // that ended without one.
    if (attached && closedByServer && !progressed) throw new NeverFinished(`Run ${state.runId} never finished.`);
    misses = progressed ? 0 : misses + 1;
    if (misses >= RETRY_MS.length) {
      throw new ConnectionLost(`Lost the connection to the server while following run ${state.runId}. The run ` +
        "goes on there: reload the page to see it again.");
    }
    setStatus(`Connection lost: re-attaching to run ${state.runId}…`, "running");
    await pause(RETRY_MS[misses]);
  }
}

/** Stop the run shown: the server cancels it, and its stream ends with `error` `cancelled`. */
export async function cancelRun() {
  state.stopRequested = true;
  if (!state.runId || state.terminal) return;  // the `start` event, when it comes, cancels it
  setStatus("Stopping…", "running");
  try {
    const response = await apiFetch(`/api/runs/${encodeURIComponent(state.runId)}/cancel`, { method: "POST" });
    // 409: it ended meanwhile, and its stream brings the terminal event; 404: following it will say so
    if (!response.ok && response.status !== 409 && response.status !== 404) {
      setStatus(`Could not stop the run (${response.status}): ${await refusalDetail(response)}`, "failed");
    }
  } catch (error) {
    setStatus(`Could not reach the server to stop the run (${error.message}). Press Stop again.`, "failed");
  }
}
