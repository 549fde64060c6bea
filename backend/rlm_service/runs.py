"""Runs as server-side resources: their events so far, the clients following them, and how to stop them.

A `LiveRun` is one run on this server. Its driver (the engine's task) appends events as they happen;
each gets the next sequence number. Any number of clients follow it with `follow(after)`: each reads
the shared list from its own position, so a client that reads slowly holds no queue of its own and
costs the run nothing, and a client that reconnects with the last number it saw gets every later event
exactly once. Closing a follower does not stop the run: whoever started it decides (`/process` cancels
it when its client leaves, unless the run was started detached).

The `RunRegistry` finds runs by id while they live and for a short while after they end, so a client
that reconnects just after the terminal event still gets it even with history off; later, history
(the store) answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from .events import Event, is_terminal

ENDED_KEPT_S = 600.0
"""How long an ended run's events stay in memory for clients that re-attach."""
ENDED_KEPT_MAX = 64
"""How many ended runs stay in memory at most (the oldest go first)."""


class LiveRun:
    """One run on this server: its events so far and its driver task."""

    def __init__(self, run_id: str, *, detached: bool = False, session_id: str | None = None) -> None:
        self.id = run_id
        self.detached = detached
        self.session_id = session_id
        self.events: list[Event] = []
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.ended_at: float | None = None
        self._changed = asyncio.Event()
        self._on_end: list[Callable[[LiveRun], None]] = []

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def emit(self, event: Event) -> None:
        """Append the run's next event (numbering it) and wake its followers."""
        if self.ended:
            raise RuntimeError(f"run {self.id} already ended; {event.type} cannot follow its terminal event")
        event.seq = len(self.events) + 1
        self.events.append(event)
        terminal = is_terminal(event)
        if terminal:
            self.ended_at = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if terminal:
            callbacks, self._on_end = self._on_end, []
            for callback in callbacks:
                callback(self)

    def on_end(self, callback: Callable[[LiveRun], None]) -> None:
        """Call `callback(run)` once the run has emitted its terminal event (at once if it has)."""
        if self.ended:
            callback(self)
        else:
            self._on_end.append(callback)

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        """The run's events numbered above `after`, then each new one as it comes, up to the terminal one."""
        index = max(after, 0)
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                yield event
            if self.ended:
                return
            await self._changed.wait()

    def cancel(self, reason: str) -> bool:
        """Stop the run; it ends with an `error` event, code `cancelled`. False if it had already ended."""
        if self.ended or self.task is None:
            return False
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.task.cancel()
        return True

    async def wait(self) -> None:
        """Until the driver task is done (its clean-up included)."""
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


class RunRegistry:
    """The runs of this server process, live and recently ended, by id."""

    def __init__(self) -> None:
        self._live: dict[str, LiveRun] = {}
        self._ended: OrderedDict[str, LiveRun] = OrderedDict()

    def add(self, run: LiveRun) -> None:
        self._live[run.id] = run
        run.on_end(self._ended_run)

    def _ended_run(self, run: LiveRun) -> None:
        self._live.pop(run.id, None)
        self._ended[run.id] = run
        self._prune()

    def _prune(self) -> None:
        now = time.monotonic()
        while self._ended:
            oldest = next(iter(self._ended.values()))
            if len(self._ended) <= ENDED_KEPT_MAX and now - (oldest.ended_at or now) < ENDED_KEPT_S:
                break
            self._ended.popitem(last=False)

    def get(self, run_id: str) -> LiveRun | None:
        self._prune()
        return self._live.get(run_id) or self._ended.get(run_id)

    def live(self) -> list[LiveRun]:
        return list(self._live.values())

    def forget(self, run_id: str) -> None:
        """Drop an ended run's events from memory (it was deleted from history)."""
        self._ended.pop(run_id, None)
