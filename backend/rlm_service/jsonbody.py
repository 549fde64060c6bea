"""Large JSON bodies, parsed in a child process that spools `POST /process`'s `input_data` to disk.

Python's JSON parser holds the interpreter lock for the whole document: tens of megabytes take a good
part of a second, during which no other request is served, even from a worker thread. So a body
larger than `INLINE_BYTES` is streamed, as it arrives, into a short-lived child process (this file,
run as a script: standard library only, so it starts in a few milliseconds). The child parses it,
writes `input_data` to a spool file as UTF-8, counts its characters and lines, hashes it, and prints
one small JSON line: the other fields and the input's description. The server never holds the parsed
input, and its event loop never waits on the parse. Smaller bodies are parsed in a thread: for them
the parse is shorter than one scheduling slice.

What the server parses or unmarshals of a body is small whatever the body's shape. Before any parse, a
body holding more than `MAX_VALUES` JSON values is refused (`too_many_values`, a scan that builds no
object): a body's size alone does not bound its cost, as 60 MB of `[],` is 20 million lists, about 1.5 GB
of Python objects that take seconds to build. And the child hands back `POST /process`'s fields, not the
values the server would only refuse: an unknown field's value or a non-string `input_data` comes back as a
placeholder of the same wrong kind, so the server's validation words the refusal as before.

With `--object` the child hands back the whole parsed document instead, marshalled: for bodies whose large
part is not one field to spool (a chat conversation). Unmarshalling is a copy, not a parse: it holds the
lock a small fraction of the time the JSON parse would. With `--check` it only counts the values, for
bodies another parser reads next (`/mcp`'s).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import sys
import tempfile
from typing import Any

INLINE_BYTES = 1024 * 1024
"""Bodies up to this size are parsed in the server (a thread); larger ones in a child process."""
HEAD_CHARS = 65536
MAX_VALUES = 100_000
"""The most JSON values (strings, numbers, booleans, nulls, lists, objects; keys not counted) a body may
hold. A `/process` request holds a handful; a chat conversation three to six per message, so this
admits conversations of tens of thousands of messages, and what the server builds from a body stays
within tens of milliseconds of work."""
MAX_FIELD_BYTES = 1024 * 1024
"""The most that `POST /process`'s fields other than `prompt` and `input_data` may take, as JSON."""
STRING_FIELDS = ("prompt", "input_data", "session_id")
FIELDS = (*STRING_FIELDS, "settings")
"""The fields of `POST /process`'s JSON body (`uploads.ProcessRequest`)."""


def too_many_values(body: bytes, limit: int = MAX_VALUES) -> bool:
    """Whether a JSON document holds more than `limit` values, found without parsing it: every value but
    the document itself follows a comma or the bracket opening its list or object, so outside strings,
    1 + commas + opening brackets bounds the count. Escaped backslashes and quotes are dropped first, so
    every quote left opens or closes a string. The scan ends once past `limit`: it visits at most about
    twice `limit` strings."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    count, start = 1, 0
    for _ in range(2 * limit + 2):  # strings are values or keys, so a document has at most two per value
        quote = text.find(b'"', start)
        stop = len(text) if quote < 0 else quote
        count += text.count(b",", start, stop) + text.count(b"[", start, stop) + text.count(b"{", start, stop)
        close = text.find(b'"', quote + 1) if quote >= 0 else -1
        if count > limit or close < 0:
            return count > limit
        start = close + 1
    return True


TOO_MANY_VALUES = (
    f"the JSON body holds more than {MAX_VALUES:,} values (strings, numbers, lists, objects…); "
    "no request needs that many: send large data as one string"
)


def _fail(status: int, message: str) -> None:
    print(json.dumps({"status": status, "detail": message}))


OBJECT, FAILED = b"\x00", b"\x01"
"""The first byte of what `--object` prints: the marshalled document follows, or a JSON refusal."""


def _parse(body: bytes) -> tuple[Any, tuple[int, str] | None]:
    if too_many_values(body):
        return None, (413, TOO_MANY_VALUES)
    try:
        return json.loads(body), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, (400, f"the body is not valid JSON: {exc}")
    except RecursionError:
        return None, (400, "the body is not valid JSON: it is nested too deeply")


def _object() -> None:
    data, problem = _parse(sys.stdin.buffer.read())
    if problem is not None:
        sys.stdout.buffer.write(FAILED + json.dumps({"status": problem[0], "detail": problem[1]}).encode())
        return
    try:
        sys.stdout.buffer.write(OBJECT + marshal.dumps(data))
    except ValueError:  # nested past what marshal writes
        sys.stdout.buffer.write(
            FAILED + json.dumps({"status": 400, "detail": "the body is nested too deeply"}).encode()
        )


def _fields(data: dict[str, Any], max_prompt_chars: int) -> dict[str, Any]:
    """The fields to hand back, `input_data` left out: an unknown field's value or a non-string where a
    string belongs becomes the placeholder 0 (refused the same way, whatever the value was), and the
    prompt is cut to enough for the server to refuse it by its length."""
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name == "input_data":
            continue
        if name not in FIELDS or (name in STRING_FIELDS and not isinstance(value, str) and value is not None):
            value = 0
        elif name == "prompt" and isinstance(value, str) and len(value) > max_prompt_chars:
            value = value[: max_prompt_chars + 1]
        fields[name] = value
    return fields


def main() -> None:
    """Read a JSON body on stdin; argv: spool directory, largest prompt in characters, largest input in bytes
    (or `--object`, or `--check`)."""
    if sys.argv[1:] == ["--object"]:
        return _object()
    if sys.argv[1:] == ["--check"]:
        return _fail(413, TOO_MANY_VALUES) if too_many_values(sys.stdin.buffer.read()) else _fail(200, "")
    spool_dir, max_prompt_chars, max_input_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data, problem = _parse(sys.stdin.buffer.read())
    if problem is not None:
        return _fail(*problem)
    if not isinstance(data, dict):
        return _fail(400, 'the JSON body must be an object like {"prompt": "..."}')
    fields = _fields(data, max_prompt_chars)
    others = json.dumps({name: value for name, value in fields.items() if name != "prompt"})
    if len(others) > MAX_FIELD_BYTES:
        return _fail(
            413,
            f"the fields besides prompt and input_data take more than {MAX_FIELD_BYTES:,} bytes as JSON; "
            "settings and session_id are small",
        )
    text = data.get("input_data", "")
    if not isinstance(text, str):
        fields["input_data"] = 0  # the server's validation names the wrong type
        return print(json.dumps({"status": 200, "fields": fields, "input": None}))
    encoded = text.encode("utf-8", "replace")
    if len(encoded) > max_input_bytes:
        return _fail(413, f"input_data is larger than RLM_MAX_INPUT_BYTES ({max_input_bytes:,} bytes)")
    fd, path = tempfile.mkstemp(prefix="upload-", suffix=".txt", dir=spool_dir)
    with os.fdopen(fd, "wb") as handle:
        handle.write(encoded)
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    described = {
        "chars": len(text),
        "lines": lines,
        "size_bytes": len(encoded),
        "head": text[:HEAD_CHARS],
        "sha256": hashlib.sha256(encoded).hexdigest(),
        "path": path,
    }
    print(json.dumps({"status": 200, "fields": fields, "input": described}))


if __name__ == "__main__":
    main()
