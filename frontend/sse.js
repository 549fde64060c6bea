// Server-Sent Events over fetch, parsed as the HTML standard says: lines end in CR, LF or CRLF, a blank
// line ends a message, `data:` lines join with "\n", the last `id:` is kept and carried by every later
// message, lines starting with ":" are comments (keep-alive pings), and a message the stream cuts off
// before its blank line is dropped.

/** Incremental parser: feed it text in any pieces; it calls onEvent({event, data, id}) per message. */
export function createSseParser(onEvent) {
  let buffer = "";
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
  return {
    push(text) {
      buffer += text;
      let start = 0;
      const eol = /\r\n|\r|\n/g;
      for (;;) {
        eol.lastIndex = start;
        const found = eol.exec(buffer);
        // A "\r" at the very end may be the first half of "\r\n": wait for the next piece.
        if (!found || (found[0] === "\r" && found.index === buffer.length - 1)) break;
        line(buffer.slice(start, found.index));
        start = found.index + found[0].length;
      }
      buffer = buffer.slice(start);
    },
    /** The stream ended: a line cut short, or a message without its blank line, is dropped. */
    end() {
      if (buffer.endsWith("\r")) line(buffer.slice(0, -1));
      buffer = "";
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
