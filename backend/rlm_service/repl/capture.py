"""Bounded, per-run capture of what generated code prints.

Standard library only: the REPL worker imports this module.

`BoundedText` keeps the head and the tail of whatever is written and counts the rest, so a cell that
prints a gigabyte costs a few kilobytes. `StreamRouter` replaces `sys.stdout`/`sys.stderr` once per
process and sends each write to the capture of the run whose code is executing (a context variable),
so concurrent runs in one process never see each other's output.
"""

from __future__ import annotations

import contextvars
import io
import sys
from collections import deque
from typing import TextIO


class BoundedText(io.TextIOBase):
    """A text sink that keeps at most `limit` characters: the first half and the last half."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = max(limit, 0)
        self._head_cap = self.limit // 2
        self._tail_cap = self.limit - self._head_cap
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        size = len(text)
        self.total += size
        if self._head_len < self._head_cap:
            take = text[: self._head_cap - self._head_len]
            self._head.append(take)
            self._head_len += len(take)
            text = text[len(take) :]
        if text and self._tail_cap:
            if len(text) >= self._tail_cap:
                self._tail = deque([text[-self._tail_cap :]])
                self._tail_len = self._tail_cap
            else:
                self._tail.append(text)
                self._tail_len += len(text)
                self._trim_tail()
        return size

    def _trim_tail(self) -> None:
        excess = self._tail_len - self._tail_cap
        while excess > 0:
            first = self._tail[0]
            if len(first) <= excess:
                self._tail.popleft()
                self._tail_len -= len(first)
                excess -= len(first)
            else:
                self._tail[0] = first[excess:]
                self._tail_len -= excess
                excess = 0

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def getvalue(self) -> str:
        """The captured text; when more was written than fits, head and tail around a marker."""
        head = "".join(self._head)
        tail = "".join(self._tail)
        if not self.truncated:
            return head + tail
        cut = self.total - len(head) - len(tail)
        marker = f"\n... [{cut:,} characters cut from the middle; {self.total:,} in all] ...\n"
        # Keep the whole text within the limit, marker included.
        spare = len(marker)
        head = head[: max(len(head) - spare // 2, 0)]
        tail = tail[min(spare - spare // 2, len(tail)) :]
        cut = self.total - len(head) - len(tail)
        marker = f"\n... [{cut:,} characters cut from the middle; {self.total:,} in all] ...\n"
        return head + marker + tail


_active: contextvars.ContextVar[io.TextIOBase | None] = contextvars.ContextVar("rlm_capture", default=None)


class StreamRouter(io.TextIOBase):
    """Stands in for `sys.stdout` or `sys.stderr`, writing to the active run's capture.

    With no active capture in the current context, writes go to `fallback` (a process-wide sink the
    worker sets for threads that generated code starts) and otherwise to the original stream.
    """

    fallback: io.TextIOBase | None = None

    def __init__(self, original: TextIO) -> None:
        super().__init__()
        self.original = original

    def _target(self) -> io.TextIOBase | TextIO:
        return _active.get() or StreamRouter.fallback or self.original

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        target = self._target()
        if target is self.original:
            target.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def install_router() -> None:
    """Route this process's `sys.stdout` and `sys.stderr` through `StreamRouter` (idempotent)."""
    if not isinstance(sys.stdout, StreamRouter):
        sys.stdout = StreamRouter(sys.stdout)
    if not isinstance(sys.stderr, StreamRouter):
        sys.stderr = StreamRouter(sys.stderr)


def activate(sink: io.TextIOBase | None) -> contextvars.Token[io.TextIOBase | None]:
    """Make `sink` receive this context's printed output; pass the token to `deactivate`."""
    return _active.set(sink)


def deactivate(token: contextvars.Token[io.TextIOBase | None]) -> None:
    _active.reset(token)
