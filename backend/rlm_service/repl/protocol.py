"""The channel between the server and a REPL worker. Standard library only.

A message is a small JSON head (a dict with a string "op") and a list of texts (each a `str` or None).
On the wire:

    >II      the head's length in bytes, the number of texts
    head     UTF-8 JSON
    >I each  every text's length in bytes (NO_TEXT for None)
    texts    their UTF-8 bytes, one after another

Nothing is ever pickled, and bulk text (prompts, the answer, figures) never goes through a JSON parser:
a JSON document of a few megabytes can expand into gigabytes of small objects and hold a parser for
seconds, raw UTF-8 cannot. The server reads a worker's messages with `read_message`, which checks every
length before it reads what the length announces; the caps below are what one message can make it hold.

Messages, server to worker:
    init {options}                      once, first
    exec, texts [code]                  run a cell
    begin                               a new run of a session: reset `answer`, list the variables
    reply {id, error?}, texts [results] answer to a batch request

Worker to server:
    ready {chars, layers, skipped}      after init, once `context` is loaded; or failed {error}
    batch {id}, texts [prompts]         generated code called llm_query/llm_batch
    rlm {id}, texts [prompts…, contexts…]   … or rlm_query/rlm_batch (a context may be None)
    done {truncated, answer_ready, notes}, texts [stdout, error, answer, notes…, figures…]
    begun, texts [one line per variable]     the answer to `begin`
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

FRAME = struct.Struct(">II")
LENGTH = struct.Struct(">I")
NO_TEXT = 0xFFFFFFFF
MAX_HEAD_BYTES = 64 * 1024
"""A head the server reads from a worker: parsing this much JSON takes a few milliseconds at worst."""
MAX_TEXTS = 100_000
MAX_TEXT_BYTES = 16 * 1024 * 1024
"""One text from a worker (a prompt, a context, the answer): decoding it takes the event loop tens of
milliseconds at worst."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""All texts of one message from a worker; also the most a run's requests in flight may hold at once."""
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
"""A cell's printed output and its error as the worker sends them (they are cut far shorter for the model)."""
_YIELD_BYTES = 1024 * 1024


class ChannelClosed(Exception):
    """The other side went away."""


class ProtocolError(ValueError):
    """The other side sent something the protocol does not allow."""


@dataclass
class Message:
    head: dict[str, Any]
    texts: list[str | None] = field(default_factory=list)
    held: int = 0
    """Bytes of texts counted against the reader's budget until the message is served."""

    @property
    def op(self) -> str:
        return str(self.head["op"])


Text = str | bytes | None


def _utf8(text: Text) -> bytes | None:
    return text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text


def encode(head: dict[str, Any], texts: Sequence[Text] = ()) -> list[bytes]:
    """A message as the pieces to write, in order. `texts` may be given already encoded as UTF-8."""
    body = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    data = [_utf8(text) for text in texts]
    lengths = array("I", (NO_TEXT if item is None else len(item) for item in data))
    if sys.byteorder == "little":
        lengths.byteswap()
    return [FRAME.pack(len(body), len(data)), body, lengths.tobytes(), *(item for item in data if item)]


def fit(text: str, limit: int) -> bytes:
    """`text` as UTF-8, cut to at most `limit` bytes on a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def parse_head(data: bytes) -> dict[str, Any]:
    try:
        head = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("a message head that is not JSON") from exc
    if not isinstance(head, dict) or not isinstance(head.get("op"), str):
        raise ProtocolError("a message head without an op")
    return head


def parse_lengths(data: bytes) -> list[int]:
    lengths = array("I")
    lengths.frombytes(data)
    if sys.byteorder == "little":
        lengths.byteswap()
    return lengths.tolist()


def check_lengths(lengths: list[int]) -> int:
    """The total of `lengths`, after checking each and the total against the caps."""
    total = 0
    for length in lengths:
        if length == NO_TEXT:
            continue
        if length > MAX_TEXT_BYTES:
            raise ProtocolError(f"a text of {length:,} bytes (at most {MAX_TEXT_BYTES:,})")
        total += length
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {total:,} bytes of text (at most {MAX_MESSAGE_BYTES:,})")
    return total


async def read_message(
    reader: asyncio.StreamReader,
    reserve: Callable[[dict[str, Any], int], Awaitable[int]],
    release: Callable[[int], None] | None = None,
) -> Message:
    """Read one message from an untrusted writer, holding no more than the caps allow.

    `reserve(head, size)` is awaited once the texts' total size is known and before they are read; it
    returns how much of the reader's budget it took (it may wait for room), and `release` gives it back if the
    message cannot be read whole (the writer died, or the read was cancelled). Raises `ProtocolError` for a
    message that breaks the caps and `ChannelClosed` when the other side is gone.
    """
    try:
        head_size, count = FRAME.unpack(await reader.readexactly(FRAME.size))
        if head_size > MAX_HEAD_BYTES:
            raise ProtocolError(f"a message head of {head_size:,} bytes (at most {MAX_HEAD_BYTES:,})")
        if count > MAX_TEXTS:
            raise ProtocolError(f"a message of {count:,} texts (at most {MAX_TEXTS:,})")
        head = parse_head(await reader.readexactly(head_size))
        lengths = parse_lengths(await reader.readexactly(LENGTH.size * count))
        held = await reserve(head, check_lengths(lengths))
        message = Message(head, held=held)
        try:
            for length in lengths:
                if length == NO_TEXT:
                    message.texts.append(None)
                    continue
                message.texts.append((await reader.readexactly(length)).decode("utf-8", "replace"))
                if length > _YIELD_BYTES:
                    await asyncio.sleep(0)  # the bytes were already buffered: let the loop serve others
        except BaseException:  # the writer died or the read was cancelled midway: what it reserved goes back
            if release is not None:
                release(held)
            raise
        return message
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed() from exc


def send_blocking(sock: socket.socket, head: dict[str, Any], texts: Sequence[Text] = ()) -> None:
    for piece in encode(head, texts):
        sock.sendall(piece)


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


def recv_blocking(sock: socket.socket) -> Message:
    """Read one message from the server (trusted: no caps on its size)."""
    head_size, count = FRAME.unpack(_recv_exact(sock, FRAME.size))
    head = parse_head(_recv_exact(sock, head_size))
    texts: list[str | None] = []
    for length in parse_lengths(_recv_exact(sock, LENGTH.size * count)):
        texts.append(None if length == NO_TEXT else _recv_exact(sock, length).decode("utf-8", "replace"))
    return Message(head, texts)
