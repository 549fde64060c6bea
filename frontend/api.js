// Which server the page talks to, and the token for it.
//
// The page talks to the server that served it unless the user chose another one: in Settings (saved),
// or by opening a link with `?api=<url>` (asked first, never saved). A token is saved for one origin
// and only ever sent with requests to that origin: pointing the page elsewhere never hands it over.

const BASE_KEY = "rlm.apiBase";
const TOKENS_KEY = "rlm.tokens";

/** The origin of a URL (relative URLs are this page's), or null when it is not an http(s) URL. */
export function originOf(url) {
  try {
    const parsed = new URL(url || location.href, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.origin : null;
  } catch {
    return null;
  }
}

let base = "";  // "" means this page's own origin

export const apiBase = () => base;
export const apiOrigin = () => (base ? originOf(base) : location.origin);
export const isCrossOrigin = () => apiOrigin() !== location.origin;

function savedTokens() {
  try {
    const tokens = JSON.parse(localStorage.getItem(TOKENS_KEY) || "{}");
    return tokens && typeof tokens === "object" ? tokens : {};
  } catch {
    return {};
  }
}

/** The token saved for the server the page talks to now. */
export const currentToken = () => savedTokens()[apiOrigin()] || "";

/** Save (or, when empty, forget) the token of the server the page talks to now. */
export function saveToken(token) {
  const tokens = savedTokens();
  if (token) tokens[apiOrigin()] = token;
  else delete tokens[apiOrigin()];
  localStorage.setItem(TOKENS_KEY, JSON.stringify(tokens));
}

/** The user chose a server in Settings: remember it ("" is this page's own). Returns an error or "". */
export function chooseServer(value) {
  const trimmed = value.trim().replace(/\/+$/, "");
  if (trimmed && !originOf(trimmed)) return `"${trimmed}" is not an http(s) address.`;
  base = trimmed && originOf(trimmed) === location.origin ? "" : trimmed;
  if (base) localStorage.setItem(BASE_KEY, base);
  else localStorage.removeItem(BASE_KEY);
  return "";
}

/**
 * Decide the server at start. `ask(origin)` is asked before following a `?api=` link to another origin.
 * Returns a message for the user when the link was not followed, else "".
 */
export function resolveServer(ask) {
  const saved = localStorage.getItem(BASE_KEY) || "";
  base = saved && originOf(saved) && originOf(saved) !== location.origin ? saved : "";
  const requested = new URLSearchParams(location.search).get("api");
  if (!requested) return "";
  const origin = originOf(requested);
  if (!origin) return `The link asked for the server "${requested}", which is not an http(s) address; ` +
    "the page uses its own server.";
  if (origin === apiOrigin()) return "";
  if (!ask(origin)) return `The page uses its own server, not ${origin}.`;
  base = requested.replace(/\/+$/, "");
  return "";
}

/** A refused request: its HTTP status and the server's reason. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** Why a request failed to reach the server at all, in words the user can act on. */
export function unreachable(error) {
  if (isCrossOrigin()) {
    return `Could not reach ${apiOrigin()}: this page may only connect to the server it came from ` +
      `(${location.origin}). Open ${apiOrigin()}/ to use that server, or set Server to empty under Settings.`;
  }
  return `Could not reach the server at ${apiOrigin()} (${error.message}). Is it running?`;
}

/** fetch() against the chosen server, with its token; the token goes only where it was saved for. */
export function apiFetch(path, options = {}) {
  const url = new URL(`${base}${path}`, location.href);
  const headers = new Headers(options.headers || {});
  const token = savedTokens()[url.origin];
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(url, { ...options, headers });
}

/** The JSON `detail` of a refusal, or the status text. */
export async function refusalDetail(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((item) => item.msg || JSON.stringify(item)).join("; ");
  } catch { /* not JSON */ }
  return response.statusText || `HTTP ${response.status}`;
}

/** apiFetch that throws an ApiError for a refusal. */
export async function api(path, options = {}) {
  const response = await apiFetch(path, options);
  if (!response.ok) throw new ApiError(response.status, await refusalDetail(response));
  return response;
}
