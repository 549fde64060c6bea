// The page's state, and the two DOM helpers every module uses.

export const $ = (id) => document.getElementById(id);

/** An element with an optional class and text (text always goes in as text, never as HTML). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export const state = {
  config: null,          // GET /api/config, once loaded
  busy: false,           // a run is being started or followed (Run, Ask and opening another run wait)
  upload: null,          // the AbortController of a /process request whose response has not come yet
  file: null,            // the chosen input file, if any
  answer: "",            // the answer shown (for Copy and Download)
  turns: [],             // the conversation shown, oldest first: {runId, prompt}; the last is the run shown
  sessionId: null,       // the session of the conversation shown, if the server keeps its REPL
  ownSession: null,      // a session this page started; ended when the user starts over with Run
  log: null,             // the RunLog of the root run shown
  children: new Map(),   // child run id -> its fold in the log
  runId: null,           // the run shown (live or replayed)
  lastSeq: 0,            // the number of the last event of that run drawn: where re-attaching resumes
  stopRequested: false,  // Stop was pressed for the run shown
  inputKept: false,      // whether the run shown kept its input on the server
  terminal: false,       // whether the run shown has ended (final or error seen)
  startedAt: 0,          // when the run shown started (ms since the epoch), for the elapsed time
  timer: null,
  stickToBottom: true,   // the log follows new output until the user scrolls up
  historyBefore: null,   // the cursor for "Older runs": {before, id} of the last run listed
  historyGroups: new Map(),   // session id -> its conversation's entry in the history list
  emptyInputAccepted: false,  // the user pressed Run again after the empty-input warning
};
