// The run shown lives in the page's address, `#run=<id>` (a conversation: its runs, oldest first,
// `#run=<id1>,<id2>`), so a refresh or a shared link shows it again: the page re-attaches to it on the
// server. The questions asked in this tab are remembered for the tab's life (sessionStorage), because a
// run's events do not carry its prompt and a server without history cannot tell it.

const PROMPTS_KEY = "rlm.prompts";
const PROMPTS_KEPT = 50;
const RUN_ID = /^[A-Za-z0-9_-]{1,64}$/;

/** The runs named by the address, oldest first (ids that could not name a run are left out). */
export function runsInAddress() {
  const value = new URLSearchParams(location.hash.slice(1)).get("run") || "";
  return value.split(",").filter((id) => RUN_ID.test(id));
}

/** Put these runs in the address (none: take them out), without adding a step to the browser's history. */
export function showInAddress(runIds) {
  const params = new URLSearchParams(location.hash.slice(1));
  if (runIds.length) params.set("run", runIds.join(","));
  else params.delete("run");
  const hash = params.toString().replaceAll("%2C", ",");
  const url = `${location.pathname}${location.search}${hash ? `#${hash}` : ""}`;
  if (url !== `${location.pathname}${location.search}${location.hash}`) history.replaceState(null, "", url);
}

function prompts() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(PROMPTS_KEY) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch {
    return {};
  }
}

export function rememberPrompt(runId, prompt) {
  try {
    const kept = Object.entries(prompts()).filter(([id]) => id !== runId).slice(1 - PROMPTS_KEPT);
    sessionStorage.setItem(PROMPTS_KEY, JSON.stringify(Object.fromEntries([...kept, [runId, prompt]])));
  } catch { /* storage full or off: the page then shows the question only when the history has it */ }
}

export const rememberedPrompt = (runId) => prompts()[runId];
