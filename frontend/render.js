// Drawing a run: one handler per event type (HANDLERS for the run itself, CHILD_HANDLERS for the runs it
// starts with rlm_query/rlm_batch), each calling small render* functions. Live runs and replays from
// the history go through the same handleEvent, so a replay looks exactly as the run did.

import hljs from "./vendor/highlight-core.min.js";
import python from "./vendor/highlight-python.min.js";
import { number, plural, seconds } from "./format.js";
import { renderMarkdown } from "./markdown.js";
import { $, el, state } from "./state.js";

hljs.registerLanguage("python", python);

// ---------------------------------------------------------------- page chrome

/** The banner under the header; `kind` names what it is about, so that fixing that can clear it. */
export function showBanner(content, { error = false, kind = "" } = {}) {
  const banner = $("banner");
  banner.hidden = false;
  banner.classList.toggle("error", error);
  banner.dataset.kind = kind;
  banner.replaceChildren(...(Array.isArray(content) ? content : [content]));
}

export function hideBanner(kind = "") {
  const banner = $("banner");
  if (!kind || banner.dataset.kind === kind) banner.hidden = true;
}

export function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`.trim();
}

export function renderConfig(config) {
  $("model-chip").textContent = `root: ${config.model || "not set"}`;
  $("sub-model-chip").textContent = `sub: ${config.sub_model || "not set"}`;
  const limits = config.limits;
  for (const [id, value] of [["max-iterations", limits.max_iterations], ["max-subcalls", limits.max_subcalls],
    ["exec-timeout", limits.exec_timeout_s]]) {
    $(id).value = value;
    $(id).max = value;
  }
  $("limits-note").textContent = `Server limits: ${plural(limits.max_iterations, "iteration")}, ` +
    `${plural(limits.max_subcalls, "sub-call")}, ${limits.exec_timeout_s} s per cell, inputs up to ` +
    `${formatLimit(limits.max_input_bytes)}. You can only lower them.`;
  if (config.setup_problem) {
    const env = el("code", "", ".env");
    showBanner([el("strong", "", "Setup needed. "), `${config.setup_problem} Put it in the server's environment or its `,
      env, " file, then restart the server."], { kind: "setup" });
  }
}

const formatLimit = (bytes) => (bytes >= 1024 ** 3 ? `${(bytes / 1024 ** 3).toFixed(1)} GB`
  : `${(bytes / 1024 ** 2).toFixed(1)} MB`);

// ---------------------------------------------------------------- the log

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

const NO_USAGE = { requests: 0, input_tokens: 0, output_tokens: 0 };

/** Clear the page of any run: the conversation, the log, the answer. */
export function resetRun() {
  state.turns = [];
  state.sessionId = null;
  $("log").replaceChildren();
  $("conversation").replaceChildren();
  $("conversation").hidden = true;
  $("answer-question").hidden = true;
  $("follow-up").hidden = true;
  state.log = new RunLog($("log"));
  clearTurn();
  state.stickToBottom = true;
  $("jump-latest").hidden = true;
}

/** What belongs to the one run shown: its numbers, its answer, its usage. */
function clearTurn() {
  state.children = new Map();
  state.terminal = false;
  state.runId = null;
  state.lastSeq = 0;
  state.startedAt = 0;
  state.stopRequested = false;
  $("run-meta").textContent = "";
  renderAnswer("", null);
  renderUsage(NO_USAGE, NO_USAGE);
  renderElapsed(0);
}

/**
 * The next question of the conversation shown (the first one too): its iterations get a section of the log,
 * headed by the question once there is more than one, and the answer before it moves up into the conversation.
 */
export function beginTurn(prompt) {
  if (state.turns.length) archiveTurn();
  clearTurn();
  const number = state.turns.length + 1;
  const question = prompt || `Question ${number}`;
  state.turns.push({ runId: null, prompt });
  const section = el("section", "turn");
  section.dataset.turn = number;
  section.append(el("h3", "turn-head", prompt ? `Question ${number} · ${prompt}` : question));
  $("log").append(section);
  state.log = new RunLog(section);
  $("answer-question").textContent = question;
  $("answer-question").hidden = number === 1;
}

/** The answer shown becomes an earlier turn of the conversation, under its question. */
function archiveTurn() {
  const turn = state.turns.at(-1);
  const item = el("li");
  item.append(el("p", "question", turn.prompt || `Question ${state.turns.length}`));
  const badge = $("answer-badge");
  if (!badge.hidden) item.append(el("span", badge.className, badge.textContent));
  const answer = el("div", "turn-answer markdown");
  answer.append(...$("answer").childNodes);
  item.append(answer);
  $("conversation").append(item);
  $("conversation").hidden = false;
}

export function followLog() {
  const log = $("log");
  if (state.stickToBottom) log.scrollTop = log.scrollHeight;
  else $("jump-latest").hidden = false;
}

function renderThought(log, evt) {
  log.card(evt.iteration).append(el("p", "thought", evt.text));
}

function renderCode(log, evt) {
  const cell = el("div", "cell");
  const pre = el("pre", "code");
  const code = el("code", "language-python hljs");
  code.innerHTML = hljs.highlight(evt.code, { language: "python", ignoreIllegals: true }).value;  // escaped by hljs
  pre.append(code);
  cell.append(pre);
  log.card(evt.iteration).append(cell);
  log.lastCell.set(evt.iteration, cell);
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
  bar.querySelector(".progress-done").style.width = `${(100 * (evt.done - evt.failed)) / total}%`;
  bar.querySelector(".progress-failed").style.width = `${(100 * evt.failed) / total}%`;
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(evt.total));
  bar.setAttribute("aria-valuenow", String(evt.done));
  bar.dataset.done = evt.done;
  bar.dataset.total = evt.total;
  const failed = evt.failed ? ` · ${number(evt.failed)} failed` : "";
  bar.querySelector(".progress-label").textContent = `sub-calls ${number(evt.done)} / ${number(evt.total)}${failed}`;
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
}

function renderFigure(log, evt) {
  if (!evt.data) {  // a run keeps its latest 64 MB of figures whole; older ones come back without their image
    log.cell(evt.iteration).append(el("p", "muted small", "A figure the server no longer keeps (the run made many)."));
    return;
  }
  const image = el("img", "figure");
  image.alt = `Figure made by the code of iteration ${evt.iteration}`;
  image.src = `data:image/png;base64,${evt.data}`;  // only PNG is ever sent
  log.cell(evt.iteration).append(image);
}

// ---------------------------------------------------------------- the answer and the figures under it

export function renderAnswer(content, ready) {
  state.answer = content || "";
  const answer = $("answer");
  const badge = $("answer-badge");
  if (!content) {
    answer.replaceChildren(el("p", "muted", "The answer takes shape here as the run builds it."));
    badge.hidden = true;
  } else {
    answer.replaceChildren(renderMarkdown(content));
    badge.hidden = false;
    badge.textContent = ready ? "Ready" : "Draft";
    badge.className = `badge ${ready ? "ready" : "draft"}`;
  }
  $("copy-answer").disabled = !content;
  $("download-answer").disabled = !content;
}

/** In place of an answer: why there is none (the run's own note, or what the page knows). */
function renderNoAnswer(text, label = "No answer") {
  const badge = $("answer-badge");
  badge.hidden = false;
  badge.textContent = label;
  badge.className = "badge none";
  $("answer").replaceChildren(el("p", "note", text));
}

export function renderUsage(root, sub) {
  for (const [id, usage] of [["usage-root", root], ["usage-sub", sub]]) {
    $(id).replaceChildren(el("span", "usage-line", plural(usage.requests, "request")),
      el("span", "usage-line", `tokens in ${number(usage.input_tokens)} · out ${number(usage.output_tokens)}`));
  }
}

export function renderElapsed(ms) {
  $("usage-elapsed").textContent = seconds(ms);
}

// What to do about an error, added to the server's message unless that already says it.
const ERROR_ADVICE = {
  auth: ["OPENAI_API_KEY", "Check OPENAI_API_KEY in the server's environment."],
  model_unavailable: ["OPENAI_API_BASE", "Check OPENAI_API_BASE and that the model server is running."],
  internal: ["log", "The server's log has the details."],
};

export function errorText(code, message) {
  let text = (message || "The run failed").trim();
  text = text[0].toUpperCase() + text.slice(1) + (/[.!?]$/.test(text) ? "" : ".");
  const [mentions, advice] = ERROR_ADVICE[code] || [];
  return advice && !text.includes(mentions) ? `${text} ${advice}` : text;
}

function finalStatus(data) {
  const iterations = plural(data.iterations, "iteration");
  if (data.ready) return [`Done in ${seconds(data.elapsed_ms)} after ${iterations}.`, "done"];
  if (data.note) return [`Stopped after ${iterations} without an answer: see the note in the Answer panel.`, "failed"];
  if (data.answer) {
    return [`Stopped after ${iterations}: the model did not mark its answer ready; the answer shown is its draft.`,
      "failed"];
  }
  return [`Stopped after ${iterations} without an answer.`, "failed"];
}

const NO_ANSWER = (iterations) => `The run stopped after ${plural(iterations, "iteration")} (the limit) before the ` +
  "model wrote an answer. Raise Max iterations under Settings, make the task smaller, or use a stronger root model.";

// ---------------------------------------------------------------- events of the run itself

export const HANDLERS = {
  start(data) {
    state.runId = data.run_id;
    state.sessionId = data.session_id || null;
    $("run-meta").textContent = `run ${data.run_id} · input ${plural(data.input.chars, "character")}, ` +
      `${plural(data.input.lines, "line")} · up to ${plural(data.limits.max_iterations, "iteration")}`;
    setStatus("Running…", "running");
  },
  thought(data) { renderThought(state.log, data); },
  code(data) {
    renderCode(state.log, data);
    setStatus(`Iteration ${data.iteration}: running code…`, "running");
  },
  subcalls(data) { renderSubcalls(state.log, data); },
  output(data) {
    renderOutput(state.log, data);
    setStatus(`Iteration ${data.iteration}: thinking…`, "running");
  },
  figure(data) { renderFigure(state.log, data); },
  child(data) { renderChild(data); },
  answer(data) { renderAnswer(data.content, data.ready); },
  usage(data) { renderUsage(data.root, data.sub); },
  final(data) {
    state.terminal = true;
    renderAnswer(data.answer, data.ready);
    if (data.note) renderNoAnswer(data.note);
    else if (!data.answer) renderNoAnswer(NO_ANSWER(data.iterations));
    renderUsage(data.usage.root, data.usage.sub);
    renderElapsed(data.elapsed_ms);
    setStatus(...finalStatus(data));
  },
  error(data) {
    state.terminal = true;
    if (data.answer) renderAnswer(data.answer, false);
    const draft = data.answer ? " The answer shown is its draft." : "";
    if (data.code === "cancelled") {  // what the user (or another client) asked for: said plainly, not as a fault
      const why = state.stopRequested ? "the run was cancelled." : errorText(data.code, data.message);
      if (!data.answer) renderNoAnswer("The run was stopped before it wrote an answer.", "Stopped");
      setStatus(`Stopped: ${why}${draft}`, "failed");
      return;
    }
    const text = errorText(data.code, data.message);
    if (!data.answer) renderNoAnswer(`The run failed: ${text}`, "Failed");
    showBanner(text, { error: true, kind: "run" });
    setStatus(`Failed: ${text}${draft}`, "failed");
  },
};

/** One event, live or replayed: `{event, data}`. Events this page does not know are ignored. */
export function handleEvent(evt) {
  const handler = HANDLERS[evt.event];
  if (handler) {
    handler(evt.data || {});
    followLog();
  }
}

// ---------------------------------------------------------------- events of child runs

/** A child run (rlm_query / rlm_batch), folded under the cell that started it. */
function childFold(evt) {
  const runId = evt.data.run_id;
  let fold = state.children.get(runId);
  if (!fold) {
    const parent = state.children.get(evt.parent.run_id)?.log || state.log;
    const details = el("details", "child");
    details.dataset.depth = evt.depth;
    const summary = el("summary", "", `Child run · depth ${evt.depth}`);
    const body = el("div", "child-body");
    details.append(summary, body);
    parent.cell(evt.parent.iteration).append(details);
    fold = { details, summary, body, depth: evt.depth, log: new RunLog(body, { child: true }), answer: null };
    state.children.set(runId, fold);
  }
  return fold;
}

function renderChildAnswer(fold, content) {
  if (!fold.answer) {
    fold.answer = el("div", "child-answer markdown");
    fold.body.append(fold.answer);
  }
  fold.answer.replaceChildren(renderMarkdown(content));
}

// A child's events arrive in its root's stream as `child` events, whatever their depth, so no child
// handler ever sees a `child` event of its own.
export const CHILD_HANDLERS = {
  start(fold, data) {
    fold.summary.textContent = `Child run · depth ${fold.depth} · input ${plural(data.input.chars, "character")}`;
  },
  thought(fold, data) { renderThought(fold.log, data); },
  code(fold, data) { renderCode(fold.log, data); },
  subcalls(fold, data) { renderSubcalls(fold.log, data); },
  output(fold, data) { renderOutput(fold.log, data); },
  figure(fold, data) { renderFigure(fold.log, data); },
  answer(fold, data) { if (data.content) renderChildAnswer(fold, data.content); },
  usage() { /* a child's usage is counted in its root run's usage events */ },
  final(fold, data) {
    renderChildAnswer(fold, data.answer || data.note || "");
    fold.summary.textContent += data.ready ? " · answered" : " · ended without a ready answer";
  },
  error(fold, data) {
    fold.body.append(el("pre", "error", `${data.code}: ${data.message}`));
    fold.summary.textContent += " · failed";
  },
};

function renderChild(evt) {
  const handler = CHILD_HANDLERS[evt.event];
  if (handler) handler(childFold(evt), evt.data);
}
