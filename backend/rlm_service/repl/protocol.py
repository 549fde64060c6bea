"""The JSON-only channel between the server and a REPL worker.

Standard library only. A frame is a 4-byte big-endian length and then that many bytes of UTF-8 JSON.
Nothing is ever pickled: a hostile worker can send only data, never objects for the server to build.

Messages, server to worker:
    {"op": "init", ...options}          once, first
    {"op": "exec", "code": str}         run a cell
    {"op": "reply", "id": int, "results": [str]}   answer to a batch request

Worker to server:
    {"op": "ready", "chars": int}       after init, once `context` is loaded
    {"op": "batch", "id": int, "prompts": [str]}   generated code called llm_query/llm_batch
    {"op": "rlm", "id": int, "prompts": [str], "contexts": [str | null]}   ... or rlm_query/rlm_batch
    {"op": "done", ...CellResult}       the cell finished
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 2**32 - 1
MAX_WORKER_FRAME = 512 * 1024 * 1024
"""The server reads no larger message from a worker: a hostile worker cannot make it allocate more."""
MAX_REQUEST_CHARS = 128 * 1024 * 1024
"""Characters of prompts in one `llm_batch` call (well under `MAX_WORKER_FRAME` once JSON-encoded)."""


class ChannelClosed(Exception):
    """The other side went away."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body):,} bytes is too large for the REPL channel")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    message = json.loads(body.decode("utf-8", "replace"))
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("malformed REPL message")
    return message


def send_blocking(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise ChannelClosed()
        received += count
    return bytes(buffer)


def recv_blocking(sock: socket.socket) -> dict[str, Any]:
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return decode(_recv_exact(sock, size))
