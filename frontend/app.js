// The RLM page: start a run, read its Server-Sent Events, render each step as it happens.
// Layers: readSse (bytes -> events) -> handleEvent (a switch on the event name) -> render* functions.

import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight-core.min.js";
import python from "./vendor/highlight-python.min.js";

hljs.registerLanguage("python", python);

// ---------------------------------------------------------------- the stream reader

/** Incremental SSE parser: feed it text in any pieces; it calls onEvent({event, data}) per message. */
export function createSseParser(onEvent) {
  let buffer = "";
  let name = "message";
  let data = [];
  const dispatch = () => {
    if (data.length) {
      const text = data.join("\n");
      let parsed = text;
      try { parsed = JSON.parse(text); } catch { /* keep the raw text */ }
      onEvent({ event: name, data: parsed });
    }
    name = "message";
    data = [];
  };
  const line = (raw) => {
    if (raw === "") return dispatch();
    if (raw.startsWith(":")) return;                        // a comment, e.g. a keep-alive ping
    const colon = raw.indexOf(":");
    const field = colon === -1 ? raw : raw.slice(0, colon);
    let value = colon === -1 ? "" : raw.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
  return {
    push(text) {
      buffer += text;
      let start = 0;
      for (;;) {
        const match = /\r\n|\r|\n/g;
        match.lastIndex = start;
        const found = match.exec(buffer);
        // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
        if (!found || (found[0] === "\r" && found.index === buffer.length - 1)) break;
        line(buffer.slice(start, found.index));
        start = found.index + found[0].length;
      }
      buffer = buffer.slice(start);
    },
    end() {
      if (buffer) { line(buffer); buffer = ""; }
      dispatch();
    },
  };
}

/** Read a fetch Response as SSE; resolves when the stream ends. Partial chunks are carried over. */
export async function readSse(response, onEvent) {
  const parser = createSseParser(onEvent);
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(decoder.decode(value, { stream: true }));
  }
  parser.push(decoder.decode());
  parser.end();
}

// ---------------------------------------------------------------- state and helpers

const $ = (id) => document.getElementById(id);
const state = {
  config: null,
  controller: null,
  file: null,
  answer: "",
  log: null,
  children: new Map(),
  startedAt: 0,
  timer: null,
  stickToBottom: true,
  terminal: false,
  openedRun: null,
  historyBefore: null,
};

const defaultApiBase = () => {
  const fromQuery = new URLSearchParams(location.search).get("api");
  if (fromQuery) return fromQuery;
  const saved = localStorage.getItem("rlm.apiBase");
  if (saved) return saved;
  return location.protocol === "file:" ? "http://127.0.0.1:8000" : "";
};
const apiBase = () => ($("api-base").value.trim() || defaultApiBase()).replace(/\/+$/, "");

function authHeaders() {
  const token = $("api-token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function formatBytes(bytes) {
  const units = ["bytes", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

const number = (n) => Number(n || 0).toLocaleString("en-US");

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- rendering

function showBanner(message, { error = false, html = false } = {}) {
  const banner = $("banner");
  banner.hidden = false;
  banner.classList.toggle("error", error);
  if (html) banner.innerHTML = DOMPurify.sanitize(message);
  else banner.textContent = message;
}

function hideBanner() {
  $("banner").hidden = true;
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`.trim();
}

function renderConfig(config) {
  $("model-chip").textContent = `root: ${config.model || "not set"}`;
  $("sub-model-chip").textContent = `sub: ${config.sub_model || "not set"}`;
  const limits = config.limits;
  $("max-iterations").value = limits.max_iterations;
  $("max-iterations").max = limits.max_iterations;
  $("max-subcalls").value = limits.max_subcalls;
  $("max-subcalls").max = limits.max_subcalls;
  $("exec-timeout").value = limits.exec_timeout_s;
  $("exec-timeout").max = limits.exec_timeout_s;
  $("limits-note").textContent = `Server limits: ${limits.max_iterations} iterations, ${number(limits.max_subcalls)} ` +
    `sub-calls, ${limits.exec_timeout_s} s per cell, inputs up to ${formatBytes(limits.max_input_bytes)}. ` +
    "You can only lower them.";
  if (config.setup_problem) {
    showBanner(`<strong>Setup needed.</strong> ${escapeHtml(config.setup_problem)} Put it in the server's ` +
      "environment or its <code>.env</code> file, then restart the server.", { html: true });
  }
}

function escapeHtml(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

/** Where one run's iterations are drawn: the main log for the root, a fold under a cell for a child. */
class RunLog {
  constructor(container, { child = false } = {}) {
    this.container = container;
    this.child = child;
    this.cards = new Map();
    this.lastCell = new Map();
  }

  card(iteration) {
    let node = this.cards.get(iteration);
    if (!node) {
      node = el(this.child ? "section" : "article", this.child ? "child-card" : "card");
      node.dataset.iteration = iteration;
      const head = el("div", "card-head");
      head.append(el("strong", "", `Iteration ${iteration}`), el("span", "card-time", ""));
      node.append(head);
      this.container.append(node);
      this.cards.set(iteration, node);
    }
    return node;
  }

  cell(iteration) {
    return this.lastCell.get(iteration) || this.card(iteration);
  }
}

function resetRun() {
  state.log = new RunLog($("log"));
  state.children = new Map();
  state.answer = "";
  state.terminal = false;
  const log = $("log");
  log.replaceChildren();
  $("run-meta").textContent = "";
  renderAnswer("", null);
  renderUsage({ requests: 0, input_tokens: 0, output_tokens: 0 }, { requests: 0, input_tokens: 0, output_tokens: 0 });
  $("usage-elapsed").textContent = "0.0 s";
  state.stickToBottom = true;
  $("jump-latest").hidden = true;
}

function followLog() {
  const log = $("log");
  if (state.stickToBottom) log.scrollTop = log.scrollHeight;
  else $("jump-latest").hidden = false;
}

function renderThought(log, evt) {
  log.card(evt.iteration).append(el("p", "thought", evt.text));
  followLog();
}

function renderCode(log, evt) {
  const cell = el("div", "cell");
  const pre = el("pre", "code");
  const code = el("code", "language-python hljs");
  code.innerHTML = hljs.highlight(evt.code, { language: "python", ignoreIllegals: true }).value;
  pre.append(code);
  cell.append(pre);
  log.card(evt.iteration).append(cell);
  log.lastCell.set(evt.iteration, cell);
  followLog();
}

function renderSubcalls(log, evt) {
  const cell = log.cell(evt.iteration);
  let bar = cell.querySelector(":scope > .progress");
  if (!bar) {
    bar = el("div", "progress");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-label", "Sub-calls");
    const track = el("div", "progress-track");
    track.append(el("div", "progress-done"), el("div", "progress-failed"));
    bar.append(track, el("div", "progress-label"));
    cell.append(bar);
  }
  const total = Math.max(evt.total, 1);
  const ok = evt.done - evt.failed;
  bar.querySelector(".progress-done").style.width = `${(100 * ok) / total}%`;
  bar.querySelector(".progress-failed").style.width = `${(100 * evt.failed) / total}%`;
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(evt.total));
  bar.setAttribute("aria-valuenow", String(evt.done));
  bar.dataset.done = evt.done;
  bar.dataset.total = evt.total;
  const failed = evt.failed ? ` · ${number(evt.failed)} failed` : "";
  bar.querySelector(".progress-label").textContent = `sub-calls ${number(evt.done)} / ${number(evt.total)}${failed}`;
  followLog();
}

function renderOutput(log, evt) {
  const cell = log.cell(evt.iteration);
  if (evt.stdout) cell.append(el("pre", "stdout", evt.stdout));
  if (evt.error) cell.append(el("pre", "error", evt.error));
  const meta = el("div", "cell-meta");
  meta.append(el("span", "", `${(evt.duration_ms / 1000).toFixed(2)} s`));
  if (!evt.stdout && !evt.error) meta.append(el("span", "", "no output"));
  if (evt.truncated) meta.append(el("span", "tag", "output cut"));
  cell.append(meta);
  followLog();
}

function renderFigure(log, evt) {
  const image = el("img", "figure");
  image.alt = `Figure made by the code of iteration ${evt.iteration}`;
  image.src = `data:image/png;base64,${evt.data}`;  // only PNG is ever sent
  log.cell(evt.iteration).append(image);
  followLog();
}

/** A child run (rlm_query / rlm_batch), folded under the cell that started it. */
function childFold(evt) {
  const runId = evt.data.run_id;
  let fold = state.children.get(runId);
  if (!fold) {
    const parent = evt.depth === 1 ? state.log : state.children.get(evt.parent.run_id)?.log || state.log;
    const details = el("details", "child");
    details.dataset.depth = evt.depth;
    const summary = el("summary", "", `Child run · depth ${evt.depth}`);
    const body = el("div", "child-body");
    details.append(summary, body);
    parent.cell(evt.parent.iteration).append(details);
    fold = { details, summary, log: new RunLog(body, { child: true }), body };
    state.children.set(runId, fold);
  }
  return fold;
}

function renderChild(evt) {
  const fold = childFold(evt);
  const data = evt.data;
  switch (evt.event) {
    case "start":
      fold.summary.textContent = `Child run · depth ${evt.depth} · input ${number(data.input.chars)} chars`;
      break;
    case "thought": renderThought(fold.log, data); break;
    case "code": renderCode(fold.log, data); break;
    case "subcalls": renderSubcalls(fold.log, data); break;
    case "output": renderOutput(fold.log, data); break;
    case "figure": renderFigure(fold.log, data); break;
    case "final": {
      const result = el("div", "child-answer markdown");
      result.innerHTML = DOMPurify.sanitize(marked.parse(data.answer || ""));
      fold.body.append(result);
      fold.summary.textContent += data.ready ? " · answered" : " · ended without a ready answer";
      break;
    }
    case "error":
      fold.body.append(el("pre", "error", `${data.code}: ${data.message}`));
      fold.summary.textContent += " · failed";
      break;
    default:
      break;
  }
  followLog();
}

function renderAnswer(content, ready) {
  state.answer = content;
  const answer = $("answer");
  const badge = $("answer-badge");
  if (!content) {
    answer.innerHTML = '<p class="muted">The answer takes shape here as the run builds it.</p>';
    badge.hidden = true;
  } else {
    answer.innerHTML = DOMPurify.sanitize(marked.parse(content));
    badge.hidden = false;
    badge.textContent = ready ? "Ready" : "Draft";
    badge.className = `badge ${ready ? "ready" : "draft"}`;
  }
  $("copy-answer").disabled = !content;
  $("download-answer").disabled = !content;
}

function renderUsage(root, sub) {
  $("usage-root").textContent = `${number(root.requests)} requests · ${number(root.input_tokens)} / ` +
    `${number(root.output_tokens)} tokens`;
  $("usage-sub").textContent = `${number(sub.requests)} requests · ${number(sub.input_tokens)} / ` +
    `${number(sub.output_tokens)} tokens`;
}

function renderElapsed(ms) {
  $("usage-elapsed").textContent = `${(ms / 1000).toFixed(1)} s`;
}

const ERROR_HINTS = {
  auth: "The model server refused the API key: check OPENAI_API_KEY.",
  model_unavailable: "The model server failed or could not be reached.",
  timeout: "The run took too long.",
  cancelled: "The run was cancelled.",
  budget: "The run hit a usage limit.",
  internal: "Something went wrong inside the service.",
};

// ---------------------------------------------------------------- events

export function handleEvent(evt) {
  const data = evt.data || {};
  switch (evt.event) {
    case "start":
      $("run-meta").textContent = `run ${data.run_id} · input ${number(data.input.chars)} chars, ` +
        `${number(data.input.lines)} lines · up to ${data.limits.max_iterations} iterations`;
      setStatus("Running…", "running");
      break;
    case "thought": renderThought(state.log, data); break;
    case "code": renderCode(state.log, data); setStatus(`Iteration ${data.iteration}: running code…`, "running"); break;
    case "subcalls": renderSubcalls(state.log, data); break;
    case "output": renderOutput(state.log, data); setStatus(`Iteration ${data.iteration}: thinking…`, "running"); break;
    case "figure": renderFigure(state.log, data); break;
    case "child": renderChild(data); break;
    case "answer": renderAnswer(data.content, data.ready); break;
    case "usage": renderUsage(data.root, data.sub); break;
    case "final":
      state.terminal = true;
      renderAnswer(data.answer, data.ready);
      renderUsage(data.usage.root, data.usage.sub);
      renderElapsed(data.elapsed_ms);
      setStatus(data.ready
        ? `Done in ${(data.elapsed_ms / 1000).toFixed(1)} s after ${data.iterations} iterations.`
        : `Stopped after ${data.iterations} iterations without a ready answer; showing the best so far.`,
      data.ready ? "done" : "failed");
      break;
    case "error":
      state.terminal = true;
      if (data.answer) renderAnswer(data.answer, false);
      showBanner(`${ERROR_HINTS[data.code] || "The run failed."} ${data.message || ""}`.trim(), { error: true });
      setStatus(`Failed (${data.code}).`, "failed");
      break;
    default:
      break; // events this page does not know yet are ignored
  }
}

// ---------------------------------------------------------------- running

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
    return { body: form, headers: authHeaders() };
  }
  return {
    body: JSON.stringify({ prompt, input_data: $("input-text").value, settings }),
    headers: { "Content-Type": "application/json", ...authHeaders() },
  };
}

async function startRun() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    showBanner("Write a prompt first: what should be done with the input?", { error: true });
    $("prompt").focus();
    return;
  }
  if (state.controller) return;
  hideBanner();
  resetRun();
  showRunActions(null);
  const controller = new AbortController();
  state.controller = controller;
  $("run-button").disabled = true;
  $("stop-button").disabled = false;
  setStatus(state.file ? `Uploading ${state.file.name}…` : "Starting…", "running");
  state.startedAt = performance.now();
  state.timer = setInterval(() => {
    if (!state.terminal) renderElapsed(performance.now() - state.startedAt);
  }, 100);
  try {
    const { body, headers } = buildRequest(prompt);
    const response = await fetch(`${apiBase()}/process`, { method: "POST", body, headers, signal: controller.signal });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
      showBanner(`The server refused the run (${response.status}): ${detail}`, { error: true });
      setStatus(`Refused (${response.status}).`, "failed");
      return;
    }
    await readSse(response, handleEvent);
    if (!state.terminal) {
      showBanner("The connection closed before the run finished.", { error: true });
      setStatus("Interrupted.", "failed");
    }
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Stopped. The server cancelled the run.", "failed");
    } else {
      showBanner(`Could not reach the server at ${apiBase() || location.origin}: ${error.message}`, { error: true });
      setStatus("Connection failed.", "failed");
    }
  } finally {
    clearInterval(state.timer);
    state.controller = null;
    $("run-button").disabled = false;
    $("stop-button").disabled = true;
    loadHistory();
  }
}

// ---------------------------------------------------------------- history and replay

async function api(path, options = {}) {
  const response = await fetch(`${apiBase()}${path}`, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function renderHistory(runs, append) {
  const list = $("history");
  if (!append) list.replaceChildren();
  for (const run of runs) {
    const item = el("li");
    const button = el("button");
    button.type = "button";
    button.dataset.runId = run.id;
    const what = el("span", "what", run.prompt_preview.replace(/<<<SCRIPT[\s\S]*SCRIPT>>>/, "").trim() || "(scripted run)");
    const when = el("span", "when", new Date(run.created * 1000).toLocaleString());
    const tag = el("span", `status-tag ${run.status}`, run.status === "finished" && !run.ready ? "not ready" : run.status);
    when.append(tag);
    button.append(what, when);
    button.addEventListener("click", () => openRun(run.id));
    item.append(button);
    list.append(item);
  }
  $("history-empty").hidden = list.children.length > 0;
}

async function loadHistory(append = false) {
  if (!state.config?.history) {
    $("history-empty").textContent = state.config ? "History is off on this server (RLM_HISTORY_DB)." :
      "Past runs appear here.";
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
    $("history-empty").textContent = error.message.startsWith("404") ? "History is off on this server." :
      `History unavailable (${error.message}).`;
  }
}

/** Replay a stored run through the same render code as a live one. */
export async function openRun(runId) {
  if (state.controller) return;
  try {
    const { run, events } = await (await api(`/api/runs/${encodeURIComponent(runId)}`)).json();
    hideBanner();
    resetRun();
    for (const event of events) handleEvent({ event: event.type, data: event });
    if (!state.terminal) setStatus(`This run is ${run.status}: it never finished.`, "failed");
    else if (run.status === "finished") setStatus(`Replayed run ${run.id}.`, "done");
    $("prompt").value = run.prompt;
    showRunActions(run.id);
    for (const button of $("history").querySelectorAll("button")) {
      button.setAttribute("aria-current", String(button.dataset.runId === run.id));
    }
  } catch (error) {
    showBanner(`Could not open the run: ${error.message}`, { error: true });
  }
}

function showRunActions(runId) {
  state.openedRun = runId;
  for (const id of ["export-json", "export-md", "delete-run"]) $(id).hidden = !runId;
}

function downloadBlob(blob, filename) {
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function exportRun(format) {
  const response = await api(`/api/runs/${state.openedRun}/export?format=${format}`);
  downloadBlob(await response.blob(), `rlm-run-${state.openedRun}.${format}`);
}

async function deleteRun() {
  if (!state.openedRun || !confirm("Delete this run from the history?")) return;
  await api(`/api/runs/${state.openedRun}`, { method: "DELETE" });
  resetRun();
  showRunActions(null);
  setStatus("Run deleted.", "done");
  loadHistory();
}

function wireHistory() {
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  $("export-json").addEventListener("click", () => exportRun("json").catch((e) => showBanner(e.message, { error: true })));
  $("export-md").addEventListener("click", () => exportRun("md").catch((e) => showBanner(e.message, { error: true })));
  $("delete-run").addEventListener("click", () => deleteRun().catch((e) => showBanner(e.message, { error: true })));
}

function stopRun() {
  if (state.controller) state.controller.abort();
}

// ---------------------------------------------------------------- input: paste, pick, drop

function selectTab(which) {
  const file = which === "file";
  $("tab-paste").setAttribute("aria-selected", String(!file));
  $("tab-file").setAttribute("aria-selected", String(file));
  $("pane-paste").hidden = file;
  $("pane-file").hidden = !file;
}

function setFile(file) {
  state.file = file;
  $("file-info").hidden = !file;
  if (file) {
    $("file-name").textContent = file.name;
    $("file-size").textContent = `(${formatBytes(file.size)})`;
    selectTab("file");
  } else {
    $("file-input").value = "";
  }
}

function wireInputs() {
  $("tab-paste").addEventListener("click", () => selectTab("paste"));
  $("tab-file").addEventListener("click", () => selectTab("file"));
  const dropzone = $("dropzone");
  dropzone.addEventListener("click", () => $("file-input").click());
  dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  $("file-input").addEventListener("change", (event) => setFile(event.target.files[0] || null));
  $("file-clear").addEventListener("click", () => setFile(null));
  const panel = document.querySelector(".input-panel");
  panel.addEventListener("dragover", (event) => { event.preventDefault(); panel.classList.add("dragging"); });
  panel.addEventListener("dragleave", () => panel.classList.remove("dragging"));
  panel.addEventListener("drop", (event) => {
    event.preventDefault();
    panel.classList.remove("dragging");
    const file = event.dataTransfer?.files?.[0];
    if (file) setFile(file);
  });
}

const EXAMPLES = {
  summary: () => ({
    prompt: "Summarize this podcast transcript: the main topics, and who argued what.",
    input: Array.from({ length: 60 }, (_, i) => {
      const minute = String(i * 2).padStart(2, "0");
      return `[00:${minute}] HOST: What changes when the context no longer fits in the model?\n` +
        `[00:${minute}] GUEST: You keep the data outside the prompt and let the model read it with code.`;
    }).join("\n"),
  }),
  plot: () => ({
    prompt: "Plot the distribution of these numbers and describe its shape.",
    input: Array.from({ length: 2000 }, () => {
      const u = 1 - Math.random();
      const v = Math.random();
      return (50 + 12 * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v)).toFixed(2);
    }).join(" "),
  }),
};

function wireExamples() {
  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => {
      const example = EXAMPLES[button.dataset.example]();
      setFile(null);
      selectTab("paste");
      $("prompt").value = example.prompt;
      $("input-text").value = example.input;
      $("prompt").focus();
    });
  }
}

function wireAnswer() {
  $("copy-answer").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(state.answer);
      setStatus("Answer copied.", "done");
    } catch {
      setStatus("Copying needs clipboard permission; use Download instead.", "failed");
    }
  });
  $("download-answer").addEventListener("click", () => {
    downloadBlob(new Blob([state.answer], { type: "text/markdown" }), "answer.md");
  });
}

function wireLog() {
  const log = $("log");
  log.addEventListener("scroll", () => {
    state.stickToBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 40;
    if (state.stickToBottom) $("jump-latest").hidden = true;
  });
  $("jump-latest").addEventListener("click", () => {
    state.stickToBottom = true;
    log.scrollTop = log.scrollHeight;
    $("jump-latest").hidden = true;
  });
}

async function loadConfig() {
  try {
    const response = await fetch(`${apiBase()}/api/config`, { headers: authHeaders() });
    if (response.status === 401) {
      showBanner("This server needs a token: open Settings and enter it in the Token field.", { error: true });
      document.querySelector("details.settings").open = true;
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state.config = await response.json();
    renderConfig(state.config);
  } catch (error) {
    showBanner(`Could not load the configuration from ${apiBase() || location.origin}: ${error.message}. ` +
      "Is the server running? Set its address under Settings.", { error: true });
  }
}

function init() {
  state.log = new RunLog($("log"));
  $("api-base").value = defaultApiBase();
  $("api-token").value = localStorage.getItem("rlm.token") || "";
  $("api-base").addEventListener("change", () => {
    localStorage.setItem("rlm.apiBase", $("api-base").value.trim());
    loadConfig().then(() => loadHistory());
  });
  $("api-token").addEventListener("change", () => {
    localStorage.setItem("rlm.token", $("api-token").value.trim());
    loadConfig().then(() => loadHistory());
  });
  $("run-form").addEventListener("submit", (event) => { event.preventDefault(); startRun(); });
  $("stop-button").addEventListener("click", stopRun);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); startRun(); }
  });
  wireInputs();
  wireExamples();
  wireAnswer();
  wireLog();
  wireHistory();
  loadConfig().then(() => loadHistory());
}

init();
