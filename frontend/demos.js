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

// ---------------------------------------------------------------- demo 1: a large server log

const SERVICES = ["api", "auth", "db", "worker", "cache", "billing"];
const PATHS = ["/v1/orders", "/v1/users", "/v1/search", "/v1/cart", "/v1/invoices"];

/** About 1 MB of one day's logs from six services, with three incidents to find. */
export function serverLog(lines = 12600) {
  const rand = random(42);
  const start = Date.UTC(2025, 2, 14, 0, 0, 0);
  let ms = 0;
  const out = [];
  for (let i = 0; i < lines; i += 1) {
    ms += 1000 + Math.floor(rand() * 12000);
    const when = new Date(start + ms).toISOString().replace(/\.\d+Z$/, "Z");
    const phase = i / lines;
    let level = "INFO";
    let service = pick(rand, SERVICES);
    let message;
    if (phase > 0.31 && phase < 0.35 && rand() < 0.6) {
      [level, service] = ["ERROR", "db"];
      message = `connection pool exhausted (${40 + Math.floor(rand() * 10)}/40 in use), waited ${
        2000 + Math.floor(rand() * 3000)}ms`;
    } else if (phase > 0.58 && phase < 0.6 && rand() < 0.5) {
      [level, service] = ["WARN", "auth"];
      message = `failed login for user=admin from 203.0.113.${Math.floor(rand() * 8)} (attempt ${
        Math.floor(rand() * 500)})`;
    } else if (phase > 0.8 && phase < 0.86 && rand() < 0.45) {
      [level, service] = ["ERROR", "billing"];
      message = `payment provider timeout after 30000ms, invoice=INV-${pad(Math.floor(rand() * 99999), 5)} retried`;
    } else if (i === Math.floor(lines * 0.5)) {
      [level, service] = ["INFO", "worker"];
      message = "deploy v2.14.0 started by ci; rolling restart of 12 pods";
    } else if (rand() < 0.03) {
      level = "WARN";
      message = `slow request ${pick(rand, PATHS)} took ${800 + Math.floor(rand() * 2000)}ms`;
    } else {
      const status = rand() < 0.97 ? 200 : pick(rand, [201, 204, 404, 409]);
      message = `request ${pick(rand, ["GET", "GET", "GET", "POST"])} ${pick(rand, PATHS)}/${
        Math.floor(rand() * 9000)} ${status} ${5 + Math.floor(rand() * 120)}ms user=u${pad(Math.floor(rand() * 5000), 4)}`;
    }
    out.push(`${when} ${level.padEnd(5)} ${service.padEnd(7)} ${message}`);
  }
  return `${out.join("\n")}\n`;
}

// ---------------------------------------------------------------- demo 2: numbers scattered in text

const PLACES = ["river bend", "old bridge", "weir", "north meadow", "mill race", "ferry steps"];
const BIRDS = ["gulls", "herons", "ducks", "cormorants"];

/** Field notes where the water levels (in cm) hide among days, times, stations, counts and wind speeds. */
export function fieldNotes(notes = 400) {
  const rand = random(2024);
  const out = [];
  for (let i = 0; i < notes; i += 1) {
    const day = 1 + Math.floor(i / 8);
    const time = `${pad(6 + Math.floor(rand() * 12))}:${pad(Math.floor(rand() * 60))}`;
    const station = 1 + Math.floor(rand() * 9);
    const level = gaussian(rand, 48, 11).toFixed(1);
    const count = Math.floor(rand() * 14);
    const wind = Math.floor(rand() * 35);
    const place = pick(rand, PLACES);
    const templates = [
      `Day ${day}, ${time}: station ${station} (${place}) shows a water level of ${level} cm; ${count} ${
        pick(rand, BIRDS)} on the bank, wind ${wind} km/h.`,
      `${time} on day ${day}. Measured ${level} cm at station ${station} near the ${place}. Counted ${count} ${
        pick(rand, BIRDS)}. Gusts up to ${wind} km/h.`,
      `Station ${station}, day ${day} (${time}): gauge reads ${level} cm. Wind ${wind} km/h from the west, ${count} ${
        pick(rand, BIRDS)} seen by the ${place}.`,
    ];
    out.push(pick(rand, templates));
  }
  return out.join("\n");
}

// ---------------------------------------------------------------- demo 3: a custom record format

const FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Tim"];
const LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Peters"];
const TAGS = ["vip", "newsletter", "reseller", "trial", "churned", "eu"];
const NOTES = [
  "Prefers letters; phone: none.",
  "Asked about \"bulk pricing\" = yes.",
  "Renewal due; see @end of contract, clause 4.",
  "Moved offices.\n  New address pending = ask again in May.",
];

/** Customer records in an export format no library reads, with the usual traps of such formats. */
export function customerRecords(records = 600) {
  const rand = random(1815);
  const out = ["# exported 2025-03-14 by crm-tool 2.3", "# one @record block per customer; fields are `key = value`", ""];
  for (let i = 1; i <= records; i += 1) {
    const first = pick(rand, FIRST);
    const last = pick(rand, LAST);
    const quoted = rand() < 0.1 ? `${first} \\"${pick(rand, ["Bud", "Doc", "Ace"])}\\" ${last}` : `${first} ${last}`;
    const tags = TAGS.filter(() => rand() < 0.22);
    const cents = Math.floor(gaussian(rand, 60000, 90000));
    const amount = (Math.abs(cents) / 100).toLocaleString("en-US", { minimumFractionDigits: 2 });
    const block = [`@record C-${pad(i, 4)}`, `  name    = "${quoted}"`];
    if (rand() > 0.08) block.push(`  email   = ${first.toLowerCase()}.${last.toLowerCase()}${i}@example.org`);
    block.push(`  joined  = ${2015 + Math.floor(rand() * 10)}-${pad(1 + Math.floor(rand() * 12))}-${
      pad(1 + Math.floor(rand() * 28))}`);
    block.push(`  tags    =${tags.length ? ` ${tags.join(" | ")}` : ""}`);
    block.push(`  balance = ${cents < 0 ? `(${amount})` : amount} EUR`);
    if (rand() < 0.3) block.push("  note    = <<<", `  ${pick(rand, NOTES)}`, "  >>>");
    block.push("@end");
    if (rand() < 0.05) block.push("# checked by the importer");
    out.push(...block, "");
  }
  return out.join("\n");
}

// ---------------------------------------------------------------- the examples the page offers

export const EXAMPLES = {
  summary: () => ({
    prompt: "Summarize this podcast transcript: the main topics, and who argued what.",
    text: transcript(),
  }),
  log: () => ({
    prompt: "This is one day of server logs. Chunk it into 20 parts and summarise them in parallel (one " +
      "llm_batch over the 20 chunks), then combine the summaries: what happened during the day, which " +
      "incidents there were, when each started and ended, and which services they affected.",
    file: new File([serverLog()], "server.log", { type: "text/plain" }),
  }),
  numbers: () => ({
    prompt: "These field notes mention many numbers. Find every water-level reading (the values in cm), " +
      "compute their mean and standard deviation, and plot the distribution as a histogram.",
    text: fieldNotes(),
  }),
  records: () => ({
    prompt: "These are customer records in a custom export format that no library reads. Write a parser for " +
      "it, test it on the first 5 entries against what you read yourself, and fix it until it is 100% " +
      "accurate. Then parse every record and report how many there are, how many carry each tag, the total " +
      "balance, and any record that does not fit the format.",
    text: customerRecords(),
  }),
};
