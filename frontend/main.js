// The page's wiring: which server, the inputs, the examples, the buttons. Nothing here draws a run.

import { apiBase, apiFetch, chooseServer, currentToken, refusalDetail, resolveServer, saveToken, unreachable }
  from "./api.js";
import { runsInAddress } from "./address.js";
import { EXAMPLES } from "./demos.js";
import { formatBytes } from "./format.js";
import { downloadBlob, loadHistory, wireHistory } from "./history.js";
import { hideBanner, renderConfig, resetRun, setStatus, showBanner } from "./render.js";
import { askFollowUp, showRuns, startRun, stopRun, tokenProblem } from "./run.js";
import { $, state } from "./state.js";

// ---------------------------------------------------------------- the server and its configuration

async function loadConfig() {
  try {
    const response = await apiFetch("/api/config");
    if (response.status === 401) {
      showBanner(tokenProblem(), { error: true, kind: "auth" });
      $("settings").open = true;
      return;
    }
    if (!response.ok) throw new Error(`${response.status}: ${await refusalDetail(response)}`);
    state.config = await response.json();
    hideBanner("auth");
    hideBanner("server");
    renderConfig(state.config);
  } catch (error) {
    showBanner(`Could not load the configuration. ${unreachable(error)}`, { error: true, kind: "server" });
  }
}

/** The configuration, then the runs the address names if the page shows none yet (showRuns loads the history
 * when it is done), else the history. */
const reload = () => loadConfig().then(() => {
  const runIds = runsInAddress();
  if (runIds.length && !state.turns.some((turn) => turn.runId) && !state.busy) showRuns(runIds);
  else loadHistory();
});

function wireServer() {
  const notice = resolveServer((origin) => confirm(
    `This link points the page at another server: ${origin}.\n\nYour prompts and input would be sent there. ` +
    "Tokens saved for other servers are never sent to it. Use that server?"));
  if (notice) setStatus(notice);
  $("api-base").value = apiBase();
  $("api-token").value = currentToken();
  $("api-base").addEventListener("change", () => {
    const problem = chooseServer($("api-base").value);
    if (problem) {
      showBanner(problem, { error: true, kind: "server" });
      return;
    }
    $("api-token").value = currentToken();
    reload();
  });
  $("api-token").addEventListener("change", () => {
    saveToken($("api-token").value.trim());
    reload();
  });
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
  state.emptyInputAccepted = false;
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
  $("input-text").addEventListener("input", () => { state.emptyInputAccepted = false; });
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

function wireExamples() {
  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => {
      const example = EXAMPLES[button.dataset.example]();
      $("prompt").value = example.prompt;
      $("input-text").value = example.text || "";
      setFile(example.file || null);
      selectTab(example.file ? "file" : "paste");
      $("prompt").focus();
    });
  }
}

// ---------------------------------------------------------------- the answer and the log

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

/** On a phone the answer comes right after the task, in the reading order as well as on screen. */
function wireLayout() {
  const phone = matchMedia("(max-width: 900px)");
  const place = () => {
    if (phone.matches) document.querySelector(".input-panel").after($("answer-panel"));
    else $("log-panel").after($("answer-panel"));
  };
  phone.addEventListener("change", place);
  place();
}

/** The runs named by the address (`#run=…`): after a refresh or from a link, shown again and followed if live. */
function wireAddress() {
  const shown = () => state.turns.map((turn) => turn.runId).join(",");
  addEventListener("hashchange", () => {
    const runIds = runsInAddress();
    if (runIds.length && runIds.join(",") !== shown()) showRuns(runIds);
  });
}

function init() {
  resetRun();
  wireServer();
  $("run-form").addEventListener("submit", (event) => { event.preventDefault(); startRun(); });
  $("stop-button").addEventListener("click", stopRun);
  $("follow-up-form").addEventListener("submit", (event) => { event.preventDefault(); askFollowUp(); });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    event.preventDefault();
    if (event.target === $("follow-up-prompt")) askFollowUp();
    else startRun();
  });
  wireInputs();
  wireExamples();
  wireAnswer();
  wireLog();
  wireHistory(showRuns);
  wireLayout();
  wireAddress();
  reload();
}

// Opened from a file, the page has no server to talk to: file-notice.js says what to do instead.
if (location.protocol !== "file:") init();
