"""Following a run that another process runs, through the database: the events stored after the follower's
position, then each new one as it is written, up to the run's terminal event.

How a follower hears that a run has new events:
- PostgreSQL: the writer sends `NOTIFY rlm_events, '<run id>'` in the transaction that writes them. Each process
  keeps one listening connection (`Listener`) and wakes the followers of that run, which read what is new. While
  the connection is down (PostgreSQL restarts), followers read every second instead, and once it is back every
  follower reads once, for what it may have missed.
- SQLite (processes of one machine): followers read every 200 ms.

A follower outlives the database's failures: a read that fails is tried again at the next turn, and the stream
goes on. A run that ends without a terminal event of its own (deleted, or left `unfinished`) ends its followers
at their next check of its status, with an `error` event `lost` in place of the one it never wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg

from .events import Event, is_terminal, lost_event, parse_event
from .store import RunStore, StoreUnavailable, off_loop
from .store_sql import SqlRunStore

log = logging.getLogger("rlm_service")

T = TypeVar("T")
POLL_SQLITE_S = 0.2
POLL_WITHOUT_LISTENER_S = 1.0
RECHECK_S = 5.0
"""How long a follower waits without news before it reads anyway and checks that the run still lives."""
OWNER_DIED = ("lost", "unfinished")
"""The statuses of a run whose process stopped before it ended the run. Its clients may have been streamed events
that it never stored: one that re-attaches after the stored events is owed a terminal event all the same."""
PAGE_CHARS = 256 * 1024
"""A stream reads a run's stored events a page at a time, about this much of their text (or one event, if larger):
not the whole run (each follower of a run with megabytes of figures held a copy of it)."""
LISTEN_RETRY_FIRST_S = 0.5
LISTEN_RETRY_MAX_S = 5.0


class Wakeups:
    """Who in this process waits for news of what (a run's id, or this process's commands)."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set whenever `key` has news, while the block runs."""
        event = asyncio.Event()
        self._waiting.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[key]

    def wake(self, key: str) -> None:
        for event in self._waiting.get(key, ()):
            event.set()

    def wake_all(self) -> None:
        for waiting in self._waiting.values():
            for event in waiting:
                event.set()


class Listener:
    """This process's one connection that `LISTEN`s on PostgreSQL's channels; each notification's payload goes
    to `wakeups`. Reconnects after a failure, with pauses growing from 0.5 s to 5 s; every reconnection (and
    every loss) wakes everyone, for what they may have missed."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        channels: tuple[str, ...],
        wakeups: Wakeups,
    ) -> None:
        self._connect = connect
        self._channels = channels
        self._wakeups = wakeups
        self.up = False

    async def run(self) -> None:
        pause = LISTEN_RETRY_FIRST_S
        failing: str | None = None
        while True:
            try:
                async with await self._connect() as connection:
                    for channel in self._channels:
                        await connection.execute(f"LISTEN {channel}")
                    self.up, pause = True, LISTEN_RETRY_FIRST_S
                    if failing is not None:
                        log.warning("listening to the database again")
                        failing = None
                    self._wakeups.wake_all()
                    async for note in connection.notifies():
                        self._wakeups.wake(note.payload)
            except (psycopg.Error, OSError) as exc:
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                if failing is None:
                    log.warning("not listening to the database (%s); following runs by polling meanwhile", reason)
                failing = reason
            finally:
                if self.up:
                    self.up = False
                    self._wakeups.wake_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, LISTEN_RETRY_MAX_S)


async def stored_events(
    store: RunStore, run_id: str, after: int = 0, first: tuple[list[dict[str, Any]], bool] | None = None
) -> AsyncIterator[Event]:
    """A run's stored events numbered above `after`, read a page at a time (starting with `first`, the page after
    `after` if it is read already); `StoreUnavailable` as the store raises."""
    page, full = first, True
    while full:
        rows, full = page if page is not None else await off_loop(store.events_page, run_id, after, PAGE_CHARS)
        page = None
        rows.reverse()
        while rows:  # each event let go of once it is sent
            event = parse_event(rows.pop())
            after = event.seq
            yield event


async def owed_lost(store: RunStore, run_id: str, seen: int, why: str) -> Event:
    """The `error` `lost` that ends the stream of a run its process left (OWNER_DIED), for a client that has events
    up to `seen`: the one stored as the run was found lost (with the answer it had started), numbered after them;
    or a new one (`why`) when none is stored. A client that saw the stored one and asks again gets it again, one
    number further: it may have seen events of that number that the dead process streamed and never stored."""
    try:
        stored = await off_loop(store.last_event, run_id)
    except StoreUnavailable as exc:
        log.debug("following a run: %s", exc)
        stored = None
    if stored is not None and stored["type"] == "error" and stored.get("code") == "lost":
        return parse_event(stored).model_copy(update={"seq": seen + 1})
    return lost_event(run_id, seen, why)


class StoreFollower:
    """Follows runs through the store; `poll_s()` says how long to wait for news before reading anyway."""

    def __init__(self, store: SqlRunStore, wakeups: Wakeups, poll_s: Callable[[], float]) -> None:
        self.store = store
        self.wakeups = wakeups
        self.poll_s = poll_s

    async def follow(self, run_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The run's events numbered above `after`, then each new one, up to the terminal one (or until the run
        ends without one)."""
        seen = after
        checked = time.monotonic()
        with self.wakeups.watch(run_id) as woken:
            while True:
                woken.clear()
                rows, full = await self._read(self.store.events_page, run_id, seen, PAGE_CHARS, unavailable=([], False))
                for data in rows:
                    event = parse_event(data)
                    seen = event.seq
                    yield event
                    if is_terminal(event):
                        return
                if full:
                    continue  # the next page at once
                if rows:
                    checked = time.monotonic()
                elif time.monotonic() - checked >= RECHECK_S:
                    checked = time.monotonic()
                    status = await self._read(self.store.status, run_id, unavailable="running")
                    if status != "running":
                        try:
                            async for event in stored_events(self.store, run_id, seen):
                                seen = event.seq
                                yield event
                                if is_terminal(event):
                                    return
                            if (
                                status not in (None, *OWNER_DIED)
                                and seen
                                and await off_loop(self._seen_to_the_end, run_id, seen)
                            ):
                                return  # the client asked for what comes after the end: nothing, as for a past run
                        except StoreUnavailable as exc:  # the database went away meanwhile: asked again later
                            log.debug("following a run: %s", exc)
                            continue
                        ending = "was deleted" if status is None else f"is {status}"
                        why = f"the run ended without a final event: it {ending}"
                        yield await owed_lost(self.store, run_id, seen, why)
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self.poll_s())

    def _seen_to_the_end(self, run_id: str, seen: int) -> bool:
        """Whether an ended run has no event numbered `seen`, or that event is its terminal one."""
        last = self.store.events_page(run_id, seen - 1, 1)[0]
        return not last or is_terminal(parse_event(last[0]))

    @staticmethod
    async def _read(call: Callable[..., T], *args: Any, unavailable: Any = None) -> T | Any:
        try:
            return await off_loop(call, *args)
        except StoreUnavailable as exc:
            log.debug("following a run: %s", exc)
            return unavailable
