"""The REPL worker process: one per run, forked by the zygote for `SubprocessRepl`. Standard library only.

It talks to the server over one inherited socket using `protocol`; it confines itself with `sandbox`,
loads `context` from a file and then runs cells on request. `llm_query`/`llm_batch` send a request
frame and wait for the server's reply, so the worker never holds a key or opens a connection of its own.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import protocol, sandbox
from .executor import MAX_FIGURES, CellOutcome, CellRunner

_CHUNK = 64 * 1024 * 1024


def load_text(path: str) -> str:
    """Read a UTF-8 file into one `str`, without a second full-size copy when the file is ASCII.

    The usual `read()` holds the bytes and the decoded text at once (twice the input). For ASCII, by
    far the common case for logs and transcripts, the file is read straight into the memory of the
    final string, chunk by chunk, so memory stays at one copy plus a chunk.
    """
    size = os.path.getsize(path)
    if size == 0:
        return ""
    with open(path, "rb", buffering=0) as handle:
        text = _new_ascii_str(size)
        data = id(text) + sys.getsizeof("") - 1  # compact ASCII strings keep their bytes after the header
        chunk = bytearray(min(_CHUNK, size))  # one buffer, reused: fresh 64 MB buffers cost page faults
        view = memoryview(chunk)
        source = (ctypes.c_char * len(chunk)).from_buffer(chunk)
        done = 0
        while done < size:
            count = handle.readinto(view[: min(len(chunk), size - done)])
            if not count:
                raise OSError(f"{path} shrank while it was read")
            if not (chunk.isascii() if count == len(chunk) else bytes(view[:count]).isascii()):
                break
            ctypes.memmove(data + done, source, count)
            done += count
        else:
            return text
        del source
        view.release()
        del text, chunk
        handle.seek(0)
        return str(handle.read(), "utf-8", "replace")


def _new_ascii_str(size: int) -> str:
    new = ctypes.pythonapi.PyUnicode_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_ssize_t, ctypes.c_uint32)
    text: str = new(size, 127)
    return text


class Channel:
    """The worker's end of the socket: a reader thread routes replies to waiting callers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.owner = os.getpid()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.SimpleQueue[protocol.Message]] = {}
        self.commands: queue.SimpleQueue[protocol.Message | None] = queue.SimpleQueue()

    def start(self) -> None:
        threading.Thread(target=self._read_forever, name="rlm-channel", daemon=True).start()

    def send(self, head: dict[str, Any], texts: Sequence[protocol.Text] = ()) -> None:
        if os.getpid() != self.owner:
            raise RuntimeError("llm_query/llm_batch work only in the REPL's own process, not in a forked child")
        with self._send_lock:
            protocol.send_blocking(self.sock, head, texts)

    def forked(self) -> None:
        """In a child that generated code forked: let go of the channel, it belongs to the parent."""
        self._send_lock = threading.Lock()
        self.sock.close()

    def _read_forever(self) -> None:
        try:
            while True:
                message = protocol.recv_blocking(self.sock)
                if message.op == "reply":
                    waiter = self._waiting.pop(message.head.get("id", -1), None)
                    if waiter is not None:
                        waiter.put(message)
                else:
                    self.commands.put(message)
        except (protocol.ChannelClosed, OSError, ValueError):
            os._exit(0)  # the server is gone: nothing left to do

    def batch(self, prompts: list[str]) -> list[str]:
        """`llm_batch`, served by the server."""
        return self._request("batch", prompts, len(prompts), "prompt")

    def rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        """`rlm_batch`: child RLMs, run by the server."""
        return self._request("rlm", [*prompts, *contexts], len(prompts), "prompt or context")

    def _request(self, op: str, texts: list[str] | list[str | None], replies: int, what: str) -> list[str]:
        """Send a request whose texts fit the server's caps (or raise, before sending); wait for the reply."""
        data = [None if text is None else text.encode("utf-8", "surrogatepass") for text in texts]
        total = 0
        for index, item in enumerate(data):
            size = 0 if item is None else len(item)
            if size > protocol.MAX_TEXT_BYTES:
                raise ValueError(
                    f"{what} {index} is {size:,} bytes of UTF-8; one may be at most {protocol.MAX_TEXT_BYTES:,} bytes"
                )
            total += size
        if total > protocol.MAX_MESSAGE_BYTES or len(data) > protocol.MAX_TEXTS:
            raise ValueError(
                f"{len(data):,} texts of {total:,} bytes of UTF-8 in one call; at most "
                f"{protocol.MAX_TEXTS:,} texts of {protocol.MAX_MESSAGE_BYTES:,} bytes: "
                "split it into several calls"
            )
        request_id = next(self._ids)
        waiter: queue.SimpleQueue[protocol.Message] = queue.SimpleQueue()
        self._waiting[request_id] = waiter
        self.send({"op": op, "id": request_id}, data)
        del data
        reply = waiter.get()
        if "error" in reply.head:
            raise RuntimeError(str(reply.head["error"]))
        if len(reply.texts) != replies:
            raise RuntimeError("the server sent a malformed reply to llm_batch")
        return [str(item) for item in reply.texts]


def _done(result: CellOutcome) -> tuple[dict[str, Any], list[protocol.Text]]:
    """A cell's result as a `done` message whose texts fit the server's caps."""
    notes = [note[:500] for note in result.notes[:20]]
    figures = result.figures[:MAX_FIGURES]
    head = {"op": "done", "truncated": result.truncated, "answer_ready": result.answer_ready, "notes": len(notes)}
    texts: list[protocol.Text] = [
        protocol.fit(result.stdout, protocol.MAX_OUTPUT_BYTES),
        None if result.error is None else protocol.fit(result.error, protocol.MAX_OUTPUT_BYTES),
        protocol.fit(result.answer_content, protocol.MAX_TEXT_BYTES),
        *notes,
        *figures,
    ]
    return head, texts


def main(fd: int, *, expected_parent: int) -> None:
    """Serve one run's cells over the channel socket `fd`; forked by the zygote (`expected_parent`)."""
    sock = socket.socket(fileno=fd)
    sandbox.die_with_parent(expected_parent)
    message = protocol.recv_blocking(sock)
    init = message.head
    protected = [pid for pid in (init.get("server_pid"), expected_parent) if isinstance(pid, int)]
    options = sandbox.SandboxOptions(
        memory_mb=int(init["memory_mb"]),
        cpu_seconds=int(init["cpu_seconds"]),
        network=bool(init["network"]),
        workdir=os.getcwd(),
        readable_files=[init["input_path"]],
        uid=init.get("uid"),
        protected_pids=protected,
        processes=int(init["processes"]),
        max_file_bytes=int(init["max_file_bytes"]),
        landlock=bool(init["landlock"]),
    )
    try:
        report = sandbox.apply(options) if init.get("sandbox", True) else sandbox.SandboxReport()
    except sandbox.SandboxError as exc:
        protocol.send_blocking(sock, {"op": "failed", "error": str(exc)})
        return
    sandbox.die_with_parent(expected_parent)  # again: the switch to the run's uid cleared it (prctl(2))
    try:
        context = load_text(init["input_path"])
    except MemoryError:
        protocol.send_blocking(
            sock,
            {"op": "failed", "error": f"the input does not fit in the worker's memory limit ({options.memory_mb} MB)"},
        )
        return
    channel = Channel(sock)
    os.register_at_fork(after_in_child=channel.forked)
    runner = CellRunner(
        context,
        channel.batch,
        rlm=channel.rlm,
        max_output_chars=int(init["max_output_chars"]),
        capture_all_threads=True,
        answer=str(message.texts[0] if message.texts else ""),
        memory_limit_mb=options.memory_mb,
    )
    channel.start()
    channel.send({"op": "ready", "chars": len(context), "layers": report.layers, "skipped": report.skipped})
    while True:
        command = channel.commands.get()
        if command is None or command.op == "exit":
            return
        if command.op == "begin":
            channel.send({"op": "begun"}, [protocol.fit(line, 400) for line in runner.begin_run()[:50]])
        if command.op == "exec":
            result = runner.run(str(command.texts[0] if command.texts else ""))
            if os.getpid() != channel.owner:
                os._exit(0)  # a child forked by the cell finished the cell's code too: it has no say
            channel.send(*_done(result))
