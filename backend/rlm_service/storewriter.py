"""The run history's writer thread: every write to the database, in order, in batched transactions, and still
writing after the database has failed. The database is any `Db`: one connection of SQLite or PostgreSQL.

Failures of two kinds:
- The database cannot be written now (a full disk, an I/O error, a locked file, a PostgreSQL server that
  restarts or cannot be reached; the `Db` tells which errors these are): the connection is closed, the write is
  kept and tried
  again, after pauses growing from 0.5 s to 5 s, until it succeeds; new writes queue behind it. The first
  failure, each new kind of failure and the recovery are logged. While the database is failing, at most
  `MAX_BACKLOG` writes wait; past that, ordinary events are dropped (and counted in the recovery's log line),
  while the writes that open and close a run are always kept.
- A write is wrong in itself (a constraint it breaks): it is dropped alone and logged; the rest of its batch
  is written.
Nothing a write raises stops the thread.

A job may be urgent (a delete): while the database is failing it is tried at once, ahead of the waiting
writes, since it may be what frees the space; if it fails, its caller hears so at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

log = logging.getLogger("rlm_service")

BATCH = 500
MAX_BACKLOG = 10_000
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


T = TypeVar("T")


class Db(Protocol):
    """One connection to the history's database, in the one SQL both dialects read: `?` marks a parameter."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Mapping[str, Any]]:
        """Run one query; its rows, by column name."""

    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """End the transaction, if one is open, without its changes; never raises."""

    def transient(self, exc: BaseException) -> bool:
        """Whether a failure may pass by itself (the database cannot be written now): the write is kept."""

    def broken(self) -> bool:
        """Whether the connection itself is gone (the database server closed it): a new one may work at once."""

    def close(self) -> None:
        """Never raises."""


def in_transaction(db: Db, work: Callable[[Db], T]) -> T:
    """`work` in one transaction on `db`: committed when it returns, rolled back when it raises."""
    db.begin()
    try:
        result = work(db)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return result


class WriteSkipped(Exception):
    """An urgent write was not made: the database failed. The message says how."""


@dataclass(eq=False)
class Job:
    """One write. `write` runs inside a transaction; `reply`, when given, gets its result once committed.
    `prepare` runs once, when the writer thread takes the job from the queue."""

    write: Callable[[Db], object] | None
    reply: Future[object] | None = None
    prepare: Callable[[], None] | None = None
    after: Callable[[Db, object], None] | None = None
    """Runs after the commit, outside the transaction, with the write's result."""
    urgent: bool = False
    droppable: bool = False
    news: str | None = None
    """What the write changed, for those waiting on it elsewhere (a run id): see `Writer`'s `announce`."""

    def start(self) -> bool:
        """False when the caller waiting for the reply has given up: then the job is not run."""
        if self.reply is None or self.reply.running():
            return True
        return self.reply.set_running_or_notify_cancel()


class _Stuck(Exception):
    def __init__(self, remaining: list[Job], error: BaseException) -> None:
        super().__init__(str(error))
        self.remaining = remaining
        self.error = error


class Writer:
    """The thread. `connect` opens its connection, again after each failure. `announce`, when given, runs last
    in each transaction with the `news` of its jobs (once each), so that the database tells its listeners
    what changed when the change is committed (PostgreSQL's `NOTIFY`)."""

    def __init__(self, connect: Callable[[], Db], announce: Callable[[Db, list[str]], None] | None = None) -> None:
        self._connect = connect
        self._announce = announce
        self._db: Db | None = None
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.failure: str | None = None
        self._failing_since = 0.0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="rlm-history", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def wait(self, reply: Future[object], timeout: float, *, give_up_while_failing: bool) -> object | None:
        """The job's result; None when it has not come within `timeout`, or (`give_up_while_failing`) as soon as
        the database is failing: the job is then cancelled if it has not started, else written later. Raises
        the job's `WriteSkipped`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return reply.result(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except TimeoutError:
                pass
            if time.monotonic() >= deadline or (give_up_while_failing and self.failure is not None):
                if reply.cancel() or not reply.done():
                    return None
                return reply.result()

    def close(self, timeout: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[Job] = []
        stopping = False
        pause = RETRY_FIRST_S
        while True:
            if not pending and not stopping:
                stopping = self._take(self._queue.get(), pending)
            stopping = self._take_waiting(pending) or stopping
            left = self._attempt(pending)
            if left is None:
                self._recovered()
                pending, pause = [], RETRY_FIRST_S
            else:
                pending = left
            if stopping:
                if pending:
                    log.error(
                        "run history: %d writes were not made before the server stopped: %s", len(pending), self.failure
                    )
                break
            if pending:
                stopping = self._pause(pending, pause)
                pause = min(pause * 2, RETRY_MAX_S)
        self._disconnect()

    def _take(self, job: Job | None, pending: list[Job]) -> bool:
        """Add a job from the queue to the pending writes; True when it is the stop marker."""
        if job is None:
            return True
        if self.failure is not None and job.droppable and len(pending) >= MAX_BACKLOG:
            self._dropped += 1
            return False
        try:
            if job.prepare is not None:
                job.prepare()
        except Exception:
            log.exception("run history: a write could not be prepared and was dropped")
            return False
        pending.append(job)
        return False

    def _take_waiting(self, pending: list[Job]) -> bool:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if self._take(job, pending):
                return True

    def _pause(self, pending: list[Job], seconds: float) -> bool:
        """Wait before trying the pending writes again, taking new jobs meanwhile. Urgent ones are tried at once;
        one that succeeds ends the pause. True when the stop marker came."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if job is None or not job.urgent:
                if self._take(job, pending):
                    return True
                continue
            urgent: list[Job] = []
            self._take(job, urgent)
            if urgent and self._attempt(urgent) is None:
                return False
        return False

    def _attempt(self, jobs: list[Job]) -> list[Job] | None:
        """Write the jobs: None when all were written, else those to try again after the database failed. An
        urgent job that fails is answered with the failure, never kept."""
        if not jobs:
            return []
        reused = self._db is not None
        try:
            if self._db is None:
                self._db = self._connect()
            self._write(self._db, jobs)
            return None
        except _Stuck as stuck:
            error, remaining = stuck.error, stuck.remaining
        except Exception as exc:  # the connection could not be opened
            error, remaining = exc, jobs
        broken = reused and self._db is not None and self._db.broken()
        self._disconnect()
        if broken:
            # A connection that sat idle may have been closed by the database server since (a restart of
            # PostgreSQL): one more try on a new one before the writes count as failed.
            return self._attempt(remaining)
        self._failed(error, len(remaining))
        kept = []
        for job in remaining:
            if not job.urgent:
                kept.append(job)
            elif job.reply is not None and not job.reply.done():
                job.reply.set_exception(WriteSkipped(self.failure or str(error)))
        return kept

    def _write(self, db: Db, jobs: list[Job]) -> None:
        """Batches in one transaction each; a batch that fails for a reason of its own is written job by job,
        so that one bad write loses only itself. Raises `_Stuck` with what is left when the database fails."""
        for start in range(0, len(jobs), BATCH):
            batch = jobs[start : start + BATCH]
            try:
                self._transaction(db, batch)
                continue
            except Exception as exc:
                if db.transient(exc):
                    raise _Stuck(jobs[start:], exc) from exc
            for index, job in enumerate(batch):
                try:
                    self._transaction(db, [job])
                except Exception as exc:
                    if db.transient(exc):
                        raise _Stuck(batch[index:] + jobs[start + BATCH :], exc) from exc
                    log.warning("run history: a write failed and was dropped: %s", exc)
                    if job.reply is not None and not job.reply.done():
                        job.reply.set_exception(WriteSkipped(str(exc)))

    def _transaction(self, db: Db, jobs: list[Job]) -> None:
        live = [job for job in jobs if job.start()]
        results: list[object] = []
        db.begin()
        try:
            for job in live:
                results.append(None if job.write is None else job.write(db))
            if self._announce is not None and (news := list(dict.fromkeys(j.news for j in live if j.news))):
                self._announce(db, news)
            db.commit()
        except BaseException:
            db.rollback()
            raise
        for job, result in zip(live, results, strict=True):
            if job.after is not None:
                try:
                    job.after(db, result)
                except Exception as exc:  # the write is committed: this must not make it run again
                    log.warning("run history: after a write: %s", exc)
            if job.reply is not None:
                job.reply.set_result(True if job.write is None else result)

    def _failed(self, error: BaseException, waiting: int) -> None:
        message = f"{type(error).__name__}: {error}"
        if self.failure is None:
            self._failing_since = time.monotonic()
        if message != self.failure:
            log.error(
                "run history: the database cannot be written (%s); %d writes wait and will be retried", message, waiting
            )
        self.failure = message

    def _recovered(self) -> None:
        if self.failure is not None:
            log.warning(
                "run history: writing again after %.0f s of failures%s",
                time.monotonic() - self._failing_since,
                f"; {self._dropped} events were dropped meanwhile" if self._dropped else "",
            )
            self.failure, self._dropped = None, 0

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
