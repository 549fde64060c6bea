"""A run's input: where it is, how big it is, and the preview the root model gets.

An input is a string (JSON requests, the Python API) or a file spooled to disk as it arrives
(uploads). `InputSpooler` writes an upload chunk by chunk, replacing undecodable UTF-8 bytes, counting
characters and lines on the way and refusing it as soon as it passes the size limit, so the server
never holds the whole upload in memory. Spool files go to the server process's own directory
(`repl.workspace.instance_directory`), which the next server removes if this one dies without cleaning up.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .repl.workspace import instance_directory

HEAD_CHARS = 65536


class InputTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the input is larger than RLM_MAX_INPUT_BYTES ({limit:,} bytes)")
        self.limit = limit


@dataclass
class RunInput:
    """The input of one run: either `text` in memory or a spooled file at `path` (owned by the run)."""

    chars: int
    lines: int
    size_bytes: int
    head: str
    text: str | None = None
    path: Path | None = None
    name: str | None = None
    sha256: str | None = None

    @classmethod
    def from_text(cls, text: str) -> RunInput:
        lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
        data = text.encode("utf-8", "replace")
        return cls(
            chars=len(text),
            lines=lines,
            size_bytes=len(data),
            head=text[:HEAD_CHARS],
            text=text,
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def discard(self) -> None:
        """Remove the spooled file if nobody took it over."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Sink(threading.Thread):
    """Hashes and writes the spooled bytes in a thread of its own: both release the GIL, so they run on
    another core while the event loop parses the next chunk."""

    def __init__(self, handle: Any) -> None:
        super().__init__(name="rlm-spool", daemon=True)
        self.handle = handle
        self.hash = hashlib.sha256()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self.error: OSError | None = None

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            if self.error is None:
                self.hash.update(chunk)
                try:
                    self.handle.write(chunk)
                except OSError as exc:
                    self.error = exc

    def close(self) -> None:
        """Finish writing; raises the first write error, if any."""
        if self.is_alive():
            self.chunks.put(None)
            self.join()
        if self.error is not None:
            raise self.error


class InputSpooler:
    """Writes an upload to a temporary file as UTF-8, counting as it goes."""

    def __init__(self, limit: int, *, directory: str | None = None, name: str | None = None) -> None:
        self.limit = limit
        self.name = name
        fd, path = tempfile.mkstemp(prefix="upload-", suffix=".txt", dir=directory or instance_directory())
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._sink = _Sink(self._file)
        self._sink.start()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.received = 0
        self.chars = 0
        self.newlines = 0
        self._last_char = ""
        self._head: list[str] = []
        self._head_len = 0
        self.size_bytes = 0

    def feed(self, chunk: bytes) -> None:
        """Add a chunk; raises `InputTooLarge` (and removes the file) once past the limit."""
        self.received += len(chunk)
        if self.received > self.limit:
            self.abort()
            raise InputTooLarge(self.limit)
        if not chunk:
            return
        if not self._decoder.getstate()[0] and chunk.isascii():
            # The common case, and the fast one: ASCII needs no decoding, and goes out as it came.
            self.chars += len(chunk)
            self.newlines += chunk.count(b"\n")
            self._last_char = chr(chunk[-1])
            if self._head_len < HEAD_CHARS:
                self._keep_head(chunk[: HEAD_CHARS - self._head_len].decode("ascii"))
            self._emit(chunk)
        else:
            self._write(self._decoder.decode(chunk))

    def _write(self, text: str) -> None:
        if not text:
            return
        self.chars += len(text)
        self.newlines += text.count("\n")
        self._last_char = text[-1]
        if self._head_len < HEAD_CHARS:
            self._keep_head(text[: HEAD_CHARS - self._head_len])
        self._emit(text.encode("utf-8"))

    def _keep_head(self, piece: str) -> None:
        self._head.append(piece)
        self._head_len += len(piece)

    def _emit(self, data: bytes) -> None:
        self.size_bytes += len(data)
        self._sink.chunks.put(data)

    def finish(self) -> RunInput:
        self._write(self._decoder.decode(b"", final=True))
        try:
            self._sink.close()
        finally:
            self._file.close()
        lines = self.newlines + (1 if self.chars and self._last_char != "\n" else 0)
        return RunInput(
            chars=self.chars,
            lines=lines,
            size_bytes=self.size_bytes,
            head="".join(self._head),
            path=self.path,
            name=self.name,
            sha256=self._sink.hash.hexdigest(),
        )

    def abort(self) -> None:
        self._sink.error = self._sink.error or OSError("aborted")
        with contextlib.suppress(OSError):
            self._sink.close()
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


SPOOL_CHUNK_BYTES = 256 * 1024
"""Read size when spooling a local file: with the sink's queue of 32 chunks, at most 8 MiB in memory."""


def spool_file(path: Path, limit: int) -> RunInput:
    """Copy a local file to a run's spool as UTF-8, a chunk at a time (never whole in memory).

    Raises `InputTooLarge` past `limit` bytes and `OSError` when the file cannot be read."""
    spooler = InputSpooler(limit, name=path.name)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(SPOOL_CHUNK_BYTES):
                spooler.feed(chunk)
    except BaseException:
        spooler.abort()
        raise
    return spooler.finish()
