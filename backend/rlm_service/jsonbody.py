"""Large JSON bodies of `POST /process`, parsed in a child process that spools `input_data` to disk.

Python's JSON parser holds the interpreter lock for the whole document: tens of megabytes take a good
part of a second, during which no other request is served, even from a worker thread. So a body
larger than `INLINE_BYTES` is streamed, as it arrives, into a short-lived child process (this file,
run as a script: standard library only, so it starts in a few milliseconds). The child parses it,
writes `input_data` to a spool file as UTF-8, counts its characters and lines, hashes it, and prints
one small JSON line: the other fields and the input's description. The server never holds the parsed
input, and its event loop never waits on the parse. Smaller bodies are parsed in a thread: for them
the parse is shorter than one scheduling slice.

With `--object` the child hands back the whole parsed document instead, marshalled: for bodies whose large
part is not one field to spool (a chat conversation). Unmarshalling is a copy, not a parse: it holds the
lock a small fraction of the time the JSON parse would.
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


def _fail(status: int, message: str) -> None:
    print(json.dumps({"status": status, "detail": message}))


OBJECT, FAILED = b"\x00", b"\x01"
"""The first byte of what `--object` prints: the marshalled document follows, or a JSON refusal."""


def _parse(body: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(body), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"the body is not valid JSON: {exc}"
    except RecursionError:
        return None, "the body is not valid JSON: it is nested too deeply"


def _object() -> None:
    data, problem = _parse(sys.stdin.buffer.read())
    if problem is not None:
        sys.stdout.buffer.write(FAILED + json.dumps({"status": 400, "detail": problem}).encode())
        return
    try:
        sys.stdout.buffer.write(OBJECT + marshal.dumps(data))
    except ValueError:  # nested past what marshal writes
        sys.stdout.buffer.write(
            FAILED + json.dumps({"status": 400, "detail": "the body is nested too deeply"}).encode()
        )


def main() -> None:
    """Read a JSON body on stdin; argv: spool directory, largest prompt in characters, largest input in bytes
    (or `--object`)."""
    if sys.argv[1:] == ["--object"]:
        return _object()
    spool_dir, max_prompt_chars, max_input_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data, problem = _parse(sys.stdin.buffer.read())
    if problem is not None:
        return _fail(400, problem)
    if not isinstance(data, dict):
        return _fail(400, 'the JSON body must be an object like {"prompt": "..."}')
    prompt = data.get("prompt")
    if isinstance(prompt, str) and len(prompt) > max_prompt_chars:
        data["prompt"] = prompt[: max_prompt_chars + 1]  # enough for the server to refuse it by its length
    text = data.pop("input_data", "")
    if not isinstance(text, str):
        data["input_data"] = text  # the server's validation names the wrong type
        return print(json.dumps({"status": 200, "fields": data, "input": None}))
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
    print(json.dumps({"status": 200, "fields": data, "input": described}))


if __name__ == "__main__":
    main()
