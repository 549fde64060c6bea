"""Who is alive among the processes that share one database: this process's heartbeat, and the sweeper that
ends the processes that died.

Both run in one thread of their own, on a connection of their own, so that neither a busy event loop nor a
full pool of connections delays them:
- The heartbeat every RLM_REPLICA_TIMEOUT_S / 3 writes the database's clock into this process's row.
- The sweeper reads the other processes' heartbeats and wakes up when the oldest would pass 3/4 of
  RLM_REPLICA_TIMEOUT_S (at most RLM_REPLICA_TIMEOUT_S / 6 apart). A process past it is dead: in one
  transaction, which only one sweeper wins (the one whose `DELETE` removes the dead process's row), its live
  runs get their terminal event, `error` code `lost`, its sessions become tombstones and its waiting commands
  are dropped (fleet_sql.bury). 3/4 and not the whole timeout, so that followers hear of a death within
  RLM_REPLICA_TIMEOUT_S of it, its delivery included; a live process's heartbeat is at most 1/3 old, which
  leaves 5/12 of the timeout for a heartbeat that comes late.
- A process sweeps only once its own heartbeats have gone through for a whole RLM_REPLICA_TIMEOUT_S, since it
  started or since the database was last unreachable (then everyone's heartbeat is old; the others get that
  long to be heard again). A death that only such a process could see is reported up to that much later.
- Now and then it also ends the live runs whose process has no row at all (it stopped without ending them),
  and forgets old commands and tombstones.
- A heartbeat that finds this process's row gone means it was taken for dead (its heartbeats did not reach the
  database in time): it registers anew under a new id and tells the fleet, which ends the runs and sessions
  the others have already reported lost.
On a clean stop the thread removes this process's rows last.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from . import fleet_sql as sql
from .store import StoreUnavailable
from .store_sql import SqlRunStore
from .storewriter import Db, in_transaction

log = logging.getLogger("rlm_service")

T = TypeVar("T")
DEAD_AFTER = 0.75
"""A process is dead when its heartbeat is older than this part of RLM_REPLICA_TIMEOUT_S (see the docstring)."""
MIN_WAIT_S = 0.02


class Pulse:
    """This process's heartbeat and sweeper. `wake(keys)` and `taken_for_dead()` are called from its thread."""

    def __init__(
        self,
        store: SqlRunStore,
        *,
        timeout_s: float,
        idle_s: float,
        wake: Callable[[list[str]], None],
        taken_for_dead: Callable[[], None],
    ) -> None:
        self.store = store
        self.dialect = store.dialect
        self.timeout_s = timeout_s
        self.dead_after_s = timeout_s * DEAD_AFTER
        self.idle_s = idle_s
        self.id = _new_id()
        self._wake = wake
        self._taken_for_dead = taken_for_dead
        self._db: Db | None = None
        self._heard_since: float | None = None
        """Since when this process's heartbeats have reached the database without a failure."""
        self._failing: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlm-pulse", daemon=True)

    def start(self) -> None:
        """Register (raises `StoreUnavailable` when the database cannot be reached) and start the thread."""
        self._register()
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """End the thread, which removes this process's rows."""
        self._stopping.set()
        self._thread.join(timeout)

    def _register(self) -> None:
        self._transaction(lambda db: sql.register(db, self.dialect, self.id, socket.gethostname(), os.getpid()))
        self.store.shared = True
        self.store.owner = self.id
        self._heard_since = time.monotonic()

    def _run(self) -> None:
        next_beat = time.monotonic() + self.timeout_s / 3
        next_tidy = time.monotonic() + self.timeout_s
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.timeout_s / 3
                wait = next_beat - time.monotonic()
                heard_for = time.monotonic() - self._heard_since if self._heard_since is not None else None
                if heard_for is not None and heard_for < self.timeout_s:
                    wait = min(wait, self.timeout_s - heard_for)
                elif heard_for is not None:
                    wait = min(wait, self._sweep())
                    if time.monotonic() >= next_tidy:
                        self._tidy()
                        next_tidy = time.monotonic() + self.timeout_s
            except StoreUnavailable as exc:
                self._heard_since = None
                if self._failing is None:
                    log.error("server process %s cannot reach the database: %s", self.id, exc)
                self._failing = str(exc)
                next_beat = time.monotonic() + self.timeout_s / 3
                wait = self.timeout_s / 3
            except Exception:
                log.exception("server process %s: heartbeat or sweep failed", self.id)
                next_beat = time.monotonic() + self.timeout_s / 3
                wait = self.timeout_s / 3
            self._stopping.wait(max(wait, MIN_WAIT_S))
        try:
            self._transaction(lambda db: sql.unregister(db, self.id))
        except StoreUnavailable as exc:
            log.warning("server process %s stopped without removing its rows: %s", self.id, exc)
        self._close()

    def _beat(self) -> None:
        if self._transaction(lambda db: sql.heartbeat(db, self.dialect, self.id)):
            if self._failing is not None:
                log.warning("server process %s reaches the database again", self.id)
                self._failing = None
            if self._heard_since is None:
                self._heard_since = time.monotonic()
            self._wake([self.id])  # its commands are looked for, in case a notification was missed
            return
        log.error(
            "server process %s was taken for dead (its heartbeats did not reach the database for %.1f s): "
            "its runs and sessions were reported lost; it ends them and registers anew",
            self.id,
            self.dead_after_s,
        )
        old, self.id = self.id, _new_id()
        self._register()
        self._wake([old])  # the fleet's command loop, waiting for the old id's commands, looks for the new id's
        self._taken_for_dead()

    def _sweep(self) -> float:
        """End the processes found dead; the seconds until the next one could be."""
        ages = self._transaction(lambda db: sql.heartbeat_ages(db, self.dialect, self.id))
        soonest = self.timeout_s / 6
        for process_id, age in ages:
            if age <= self.dead_after_s:
                soonest = min(soonest, self.dead_after_s - age + MIN_WAIT_S)
                continue
            ended = self._transaction(
                functools.partial(
                    sql.bury,
                    dialect=self.dialect,
                    process_id=process_id,
                    older_than_s=self.dead_after_s,
                    timeout_s=self.timeout_s,
                )
            )
            if ended is not None:
                log.error(
                    "server process %s is dead (no heartbeat for %.1f s): %d of its runs ended as lost",
                    process_id,
                    age,
                    len(ended),
                )
                self._wake(ended)
        return soonest

    def _tidy(self) -> None:
        def work(db: Db) -> list[str]:
            sql.tidy(db, self.dialect, self.idle_s)
            return sql.orphans(db, self.dialect)

        if ended := self._transaction(work):
            log.error("%d runs whose server process stopped without ending them ended as lost", len(ended))
            self._wake(ended)

    def _transaction(self, work: Callable[[Db], T]) -> T:
        """`work` in one transaction on this thread's connection; `StoreUnavailable` when it cannot be reached."""
        try:
            if self._db is None:
                self._db = self.store.connection()
            return in_transaction(self._db, work)
        except Exception as exc:
            if self._db is not None and not self._db.transient(exc):
                raise
            self._close()
            raise StoreUnavailable(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _new_id() -> str:
    return "p" + uuid.uuid4().hex[:15]
