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
  controller: null,      // the AbortController of the run in progress
  file: null,            // the chosen input file, if any
  answer: "",            // the answer shown (for Copy and Download)
  log: null,             // the RunLog of the root run
  children: new Map(),   // child run id -> its fold in the log
  runId: null,           // the run shown (live or replayed)
  inputKept: false,      // whether the run shown kept its input on the server
  terminal: false,       // whether the run shown has ended (final or error seen)
  startedAt: 0,
  timer: null,
  stickToBottom: true,   // the log follows new output until the user scrolls up
  historyBefore: null,   // the cursor for "Older runs"
  emptyInputAccepted: false,  // the user pressed Run again after the empty-input warning
};
