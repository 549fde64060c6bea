// Server-Sent Events over fetch, parsed as the HTML standard says: lines end in CR, LF or CRLF, a blank
// line ends a message, `data:` lines join with "\n", the last `id:` is kept and carried by every later
// message, lines starting with ":" are comments (keep-alive pings), and a message the stream cuts off
// before its blank line is dropped.

/** Incremental parser: feed it text in any pieces; it calls onEvent({event, data, id}) per message. */
export function createSseParser(onEvent) {
  let name = "";
  let data = [];
  let lastId = "";
  const dispatch = () => {
    if (data.length) {
      const text = data.join("\n");
      let parsed = text;
      try { parsed = JSON.parse(text); } catch { /* not JSON: the raw text is the data */ }
      onEvent({ event: name || "message", data: parsed, id: lastId });
    }
    name = "";
    data = [];
  };
  const line = (raw) => {
    if (raw === "") return dispatch();
    if (raw.startsWith(":")) return;
    const colon = raw.indexOf(":");
    const field = colon === -1 ? raw : raw.slice(0, colon);
    let value = colon === -1 ? "" : raw.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) lastId = value;
  };
  // The pieces of a line not yet ended, joined once it ends: appended to one string and scanned again at each
  // piece, a large event (a 4 Mi-character answer in 16 KiB pieces) would take time quadratic in its size,
  // seconds in which the page does not respond.
  let pending = [];
  let skipLf = false;  // the last piece ended in "\r": a "\n" opening the next one belongs to it
  return {
    push(text) {
      if (!text) return;  // a piece cut inside a character decodes to nothing: a "\r" before it still pairs
      if (skipLf && text.startsWith("\n")) text = text.slice(1);
      skipLf = false;
      const eol = /\r\n|\r|\n/g;
      let start = 0;
      for (let found = eol.exec(text); found; found = eol.exec(text)) {
        pending.push(text.slice(start, found.index));
        const whole = pending.join("");
        pending = [];
        start = eol.lastIndex;
        skipLf = found[0] === "\r" && start === text.length;
        line(whole);
      }
      if (start < text.length) pending.push(text.slice(start));
    },
    /** The stream ended: a line cut short, or a message without its blank line, is dropped. */
    end() {
      pending = [];
      skipLf = false;
      name = "";
      data = [];
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
