// One-click examples with sample data the page makes itself (no downloads). Each is seeded, so a demo
// gives the same data every time.

/** A small seeded random generator (mulberry32): numbers in [0, 1). */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pick = (rand, items) => items[Math.floor(rand() * items.length)];

/** `k` different items, in random order (a partial Fisher–Yates shuffle). */
function sample(rand, items, k) {
  const copy = [...items];
  for (let i = 0; i < k; i += 1) {
    const j = i + Math.floor(rand() * (copy.length - i));
    [copy[i], copy[j]] = [copy[j], copy[i]];
  }
  return copy.slice(0, k);
}
const pad = (n, width = 2) => String(n).padStart(width, "0");

/** A normally distributed number (Box–Muller). */
function gaussian(rand, mean, sd) {
  const u = 1 - rand();
  const v = rand();
  return mean + sd * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

/** "04:07" under an hour, "1:02:33" past it. */
export function clock(totalSeconds) {
  const h = Math.floor(totalSeconds / 3600);
  const m = Math.floor((totalSeconds % 3600) / 60);
  const s = totalSeconds % 60;
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${pad(m)}:${pad(s)}`;
}

// ---------------------------------------------------------------- a podcast transcript

const EXCHANGES = [
  ["HOST", "What changes when the context no longer fits in the model?"],
  ["GUEST", "You keep the data outside the prompt and let the model read it with code."],
  ["HOST", "Doesn't that make the model slower?"],
  ["GUEST", "Each call is smaller, and the calls over the chunks run in parallel, so it is often faster."],
  ["HOST", "How does it know where to look?"],
  ["GUEST", "It prints a little, searches with regular expressions, and only then asks sub-models about chunks."],
  ["HOST", "Some people say long-context models make this unnecessary."],
  ["GUEST", "I disagree: quality drops long before the window is full, and you pay for every token, every turn."],
  ["HOST", "What about mistakes in the code it writes?"],
  ["GUEST", "It sees the traceback and fixes it, like we do. Verifying with code is the point."],
];

function transcript() {
  const rand = random(7);
  let at = 0;
  const lines = [];
  for (let round = 0; round < 6; round += 1) {
    for (const [who, text] of EXCHANGES) {
      lines.push(`[${clock(at)}] ${who}: ${text}`);
      at += 12 + Math.floor(rand() * 40);
    }
  }
  return lines.join("\n");
}

// The three demos are the command line's (backend/rlm_service/demos.py, `rlm-service sample NAME`): the
// same tasks and the same kinds of data, made here so that the page needs nothing but a click.

// ---------------------------------------------------------------- demo 1: a large service log

const SERVICES = ["checkout-api", "auth", "search", "inventory", "payments", "mailer"];
const PATHS = ["/api/cart", "/api/login", "/api/search?q=shoes", "/api/items/42", "/api/pay", "/api/orders"];
const hex32 = (rand) => Math.floor(rand() * 2 ** 32).toString(16).padStart(8, "0");
const between = (rand, low, high) => low + Math.floor(rand() * (high - low + 1));

/** A day of a service's log (1.6 MB), with four incidents a summary should find: a database outage on the
 * checkout path, a burst of payment-provider timeouts, a bad deploy of search that a rollback fixed, and a
 * disk filling up on the mailer. */
export function serviceLog(lines = 20000) {
  const rand = random(42);
  const start = Date.UTC(2025, 2, 14);
  const step = 86400 / lines;
  const out = [];
  for (let index = 0; index < lines; index += 1) {
    const at = new Date(start + (index * step + rand() * step) * 1000);
    const hour = at.getUTCHours() + at.getUTCMinutes() / 60;
    const stamp = at.toISOString();
    const request = `req=${hex32(rand)}`;
    if (hour >= 9.5 && hour < 10.25 && rand() < 0.6) {
      out.push(`${stamp} ERROR checkout-api ${request} db: connection pool exhausted (50/50 in use), waited ${
        between(rand, 5000, 30000)}ms`);
    } else if (hour >= 14 && hour < 14.5 && rand() < 0.4) {
      out.push(`${stamp} WARN  payments ${request} provider timeout after 10000ms, retry ${between(rand, 1, 3)}/3`);
    } else if (hour >= 17 && hour < 17.75 && rand() < 0.5) {
      out.push(`${stamp} ERROR search ${request} NullPointerException in RankingV2.score (build 2025.03.14-2)`);
    } else if (hour >= 21 && rand() < 0.05) {
      out.push(`${stamp} WARN  mailer disk /var/spool at ${Math.min(99, Math.floor(80 + (hour - 21) * 6))}% full`);
    } else if (rand() < 0.002) {
      out.push(`${stamp} INFO  deploy ${pick(rand, SERVICES)} build 2025.03.14-${between(rand, 1, 3)} rolled out`);
    } else {
      const draw = rand();
      const status = draw < 0.8 ? 200 : draw < 0.85 ? 201 : draw < 0.93 ? 304 : draw < 0.99 ? 404 : 500;
      const ms = Math.max(1, Math.floor(Math.exp(gaussian(rand, 3.5, 0.6))));
      out.push(`${stamp} ${status === 500 ? "ERROR" : "INFO "} ${pick(rand, SERVICES)} ${request} ${
        pick(rand, ["GET", "POST"])} ${pick(rand, PATHS)} ${status} ${ms}ms`);
    }
    if (index === Math.floor((lines * 71) / 100)) out.push(`${stamp} INFO  deploy search build 2025.03.14-2 rolled out`);
    if (index === Math.floor((lines * 74) / 100)) out.push(`${stamp} INFO  deploy search rolled back to build 2025.03.14-1`);
  }
  return `${out.join("\n")}\n`;
}

// ---------------------------------------------------------------- demo 2: numbers scattered in text

const PLACES = ["the Lisbon edge", "the Frankfurt cluster", "the Oregon replica", "the Tokyo cache", "the on-call laptop"];
const SENTENCES = [
  (v) => `At ${v.clock} a request through ${v.place} took ${v.value} ms, and ${v.count} others queued behind it.`,
  (v) => `The probe from ${v.place} came back in ${v.value} ms (attempt ${v.count}).`,
  (v) => `Someone on the team noted at ${v.clock} that ${v.place} answered in ${v.value} ms.`,
  (v) => `${v.count} users reported slowness; the trace shows ${v.value} ms spent in ${v.place}.`,
  (v) => `Nothing unusual at ${v.clock}: ${v.place} replied after ${v.value} ms.`,
];
const FILLER = [
  "The weather was calm and the release train left on time.",
  "Coffee ran out on the third floor around noon.",
  "Ticket 4411 was closed as a duplicate of ticket 3920.",
  "The dashboards were redrawn twice because of a browser update.",
];

/** Prose notes with `count` response times in them (the numbers followed by "ms"), from two populations
 * (fast cached answers and slow uncached ones); times of day, counts and ticket numbers are not. */
export function responseNotes(count = 600) {
  const rand = random(2024);
  const out = [];
  for (let i = 0; i < count; i += 1) {
    const value = rand() < 0.65 ? gaussian(rand, 120, 18) : gaussian(rand, 310, 45);
    const clock = `${pad(between(rand, 0, 23))}:${pad(between(rand, 0, 59))}`;
    out.push(pick(rand, SENTENCES)({ clock, place: pick(rand, PLACES), value: Math.max(value, 5).toFixed(1),
      count: between(rand, 2, 40) }));
    if (rand() < 0.3) out.push(pick(rand, FILLER));
  }
  const paragraphs = [];
  for (let i = 0; i < out.length; i += 6) paragraphs.push(out.slice(i, i + 6).join(" "));
  return `${paragraphs.join("\n\n")}\n`;
}

// ---------------------------------------------------------------- demo 3: records in a made-up format

const FIRST = ["Mara", "Tomas", "Ines", "Kofi", "Yuki", "Lena", "Omar", "Priya", "Jonas", "Ada"];
const LAST = ["Ellison", "Reyes", "Okafor", "Tanaka", "Lindqvist", "Haddad", "Rao", "Novak", "Byrne", "Costa"];
const WORDS = ["Quiet", "Harbour", "Glass", "River", "Winter", "Cartographer", "Salt", "Orchard", "Signal", "Lantern",
  "Paper", "Atlas", "Night", "Garden", "Iron", "Letters"];

/** `count` book records: a header and an END line around `Key:: value` lines whose keys come in any case;
 * authors separated by ";"; a year with an optional edition, "1987 (2. ed.)"; a price in euros with a
 * decimal comma; optional fields left out; notes that go on over indented lines and may contain "::"
 * themselves; one or two blank lines between records. */
export function bookRecords(count = 400) {
  const rand = random(1815);
  const key = (name) => pick(rand, [name, name.toUpperCase(), name.toLowerCase()]);
  const person = () => `${pick(rand, FIRST)} ${pick(rand, LAST)}`;
  const blocks = [];
  for (let number = 1; number <= count; number += 1) {
    let title = (rand() < 0.4 ? "The " : "") + sample(rand, WORDS, between(rand, 1, 3)).join(" ");
    if (rand() < 0.15) title += `: ${pick(rand, WORDS)} and ${pick(rand, WORDS)}`;
    const authorCount = rand() < 0.7 ? 1 : rand() < 0.83 ? 2 : 3;
    const authors = Array.from({ length: authorCount }, person);
    const edition = rand() < 0.2 ? ` (${between(rand, 2, 5)}. ed.)` : "";
    const lines = [`=== BOOK #${pad(number, 4)} ===`, `${key("Title")}:: ${title}`,
      `${key("By")}:: ${authors.join("; ")}`, `${key("Year")}:: ${between(rand, 1890, 2024)}${edition}`];
    if (rand() < 0.7) lines.push(`${key("Price")}:: €${(4 + rand() * 56).toFixed(2).replace(".", ",")}`);
    lines.push(`${key("Shelf")}:: ${pick(rand, [..."ABCDEFG"])}-${between(rand, 1, 30)}/${between(rand, 1, 9)}`);
    if (rand() < 0.35) {
      lines.push(`${key("Notes")}:: ${rand() < 0.5 ? `Signed copy; ${pick(rand, WORDS).toLowerCase()} on the cover.`
        : "Key:: value pairs in the notes are part of the notes."}`);
      if (rand() < 0.5) lines.push(`    Donated by ${person()}.`);
    }
    lines.push("=== END ===");
    blocks.push(lines.join("\n") + "\n".repeat(rand() < 0.5 ? 1 : 2));
  }
  return blocks.join("\n");
}

// ---------------------------------------------------------------- the examples the page offers

export const EXAMPLES = {
  summary: () => ({
    prompt: "Summarize this podcast transcript: the main topics, and who argued what.",
    text: transcript(),
  }),
  log: () => ({
    prompt: "Chunk this log into 20 parts and summarise them in parallel (one llm_batch), then combine the " +
      "summaries into one report: what happened over the day, when, and which errors were most frequent.",
    file: new File([serviceLog()], "app.log", { type: "text/plain" }),
  }),
  numbers: () => ({
    prompt: "Find every response time (the numbers in ms) in this text, give their mean and standard " +
      "deviation, and plot their distribution.",
    text: responseNotes(),
  }),
  records: () => ({
    prompt: "Write a parser for these book records, test it on the first 5 entries, and fix it until it is " +
      "100% accurate on them; then parse all of them and report how many there are, how many distinct " +
      "authors, and the five fullest shelves.",
    text: bookRecords(),
  }),
};
