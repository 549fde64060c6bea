"""Run history: every run and every event it streamed, kept so users can come back to them.

`RunStore` is the interface; `SqliteRunStore` the default, an embedded SQLite database. Writes go
through one thread of their own, so recording an event never blocks the event loop; reads open their
own connection. A run that was still `running` when the server stopped (a crash, a kill) is marked
`unfinished` when the store opens again: it is kept, not lost.

The input itself is stored only when the run asked for it (`keep_input`): it can be huge or private.
Then it is a file beside the database, `inputs/<run id>.txt`.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .events import ErrorEvent, FinalEvent, _Event

log = logging.getLogger("rlm_service")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    input_chars INTEGER NOT NULL,
    input_lines INTEGER NOT NULL,
    input_bytes INTEGER NOT NULL,
    input_sha256 TEXT,
    input_name TEXT,
    input_kept INTEGER NOT NULL DEFAULT 0,
    answer TEXT,
    ready INTEGER,
    iterations INTEGER,
    usage TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""


@dataclass
class RunRecord:
    """What a run is, as the history lists it."""

    id: str
    created: float
    status: str
    prompt: str
    settings: dict[str, Any]
    input_chars: int
    input_lines: int
    input_bytes: int
    input_sha256: str | None = None
    input_name: str | None = None
    input_kept: bool = False
    finished: float | None = None
    answer: str | None = None
    ready: bool | None = None
    iterations: int | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RunStore(Protocol):
    def begin(self, record: RunRecord) -> None:
        """A run started."""

    def keep_input(self, run_id: str, source: Path) -> None:
        """The run asked to keep its input: copy it in (runs in a thread; inputs can be large)."""

    def record(self, run_id: str, event: _Event) -> None:
        """One event of a run, in order (not changed after it is recorded). Terminal events also close
        the run's record."""

    def abandon(self, run_id: str, status: str) -> None:
        """The run ended without a terminal event (cancelled by its client)."""

    def list(self, *, limit: int, before: float | None) -> list[RunRecord]:
        """Runs, newest first, created before `before` when given."""

    def get(self, run_id: str) -> tuple[RunRecord, list[dict[str, Any]]] | None:
        """A run and all its events, or None."""

    def delete(self, run_id: str) -> bool:
        """Forget a run; False when there was none."""

    def input_path(self, run_id: str) -> Path | None:
        """Where a kept input is, if it was kept."""

    def flush(self) -> None:
        """Wait until everything recorded so far is written."""

    def close(self) -> None: ...


_Job = Callable[[sqlite3.Connection], None]


class _AfterCommit:
    """A job that runs once the batch it is in has been committed."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def __call__(self, db: sqlite3.Connection) -> None:
        self.callback()


class SqliteRunStore:
    """The default store: one SQLite file, one writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inputs = path.parent / "inputs"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            db.execute("UPDATE runs SET status = 'unfinished' WHERE status = 'running'")
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_forever, name="rlm-history", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def _write_forever(self) -> None:
        db = self._connect()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                while len(batch) < 500:  # what is already waiting goes into the same transaction
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        self._commit(db, batch)
                        return
                    batch.append(job)
                self._commit(db, batch)
        finally:
            db.close()

    @staticmethod
    def _commit(db: sqlite3.Connection, batch: list[_Job]) -> None:
        """Run a batch in one transaction; if it fails, run its jobs one by one so one bad row loses
        only itself. Flush markers run after the commit, so a flush sees everything before it."""
        after = [job for job in batch if isinstance(job, _AfterCommit)]
        writes = [job for job in batch if not isinstance(job, _AfterCommit)]
        try:
            db.execute("BEGIN")
            for job in writes:
                job(db)
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            for job in writes:
                try:
                    job(db)
                except sqlite3.Error as exc:
                    log.warning("run history: a write failed: %s", exc)
        for job in after:
            job(db)

    def _submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def begin(self, record: RunRecord) -> None:
        row = (record.id, record.created, record.status, record.prompt, json.dumps(record.settings),
               record.input_chars, record.input_lines, record.input_bytes, record.input_sha256, record.input_name,
               int(record.input_kept))
        self._submit(lambda db: db.execute(
            "INSERT INTO runs (id, created, status, prompt, settings, input_chars, input_lines, input_bytes, "
            "input_sha256, input_name, input_kept) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row))

    def keep_input(self, run_id: str, source: Path) -> None:
        shutil.copyfile(source, self.inputs / f"{run_id}.txt")
        self._submit(lambda db: db.execute("UPDATE runs SET input_kept = 1 WHERE id = ?", (run_id,)))

    def record(self, run_id: str, event: _Event) -> None:
        def write(db: sqlite3.Connection) -> None:  # in the writer thread: serializing is not the loop's work
            db.execute("INSERT INTO events (run_id, seq, type, data) VALUES "
                       "(?, (SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE run_id = ?), ?, ?)",
                       (run_id, run_id, event.type, event.model_dump_json()))
            if isinstance(event, FinalEvent):
                db.execute("UPDATE runs SET status = 'finished', finished = ?, answer = ?, ready = ?, "
                           "iterations = ?, usage = ? WHERE id = ?",
                           (time.time(), event.answer, int(event.ready), event.iterations,
                            event.usage.model_dump_json(), run_id))
            elif isinstance(event, ErrorEvent):
                db.execute("UPDATE runs SET status = 'failed', finished = ?, answer = ?, error = ? WHERE id = ?",
                           (time.time(), event.answer, json.dumps({"code": event.code, "message": event.message}),
                            run_id))

        self._submit(write)

    def abandon(self, run_id: str, status: str) -> None:
        self._submit(lambda db: db.execute(
            "UPDATE runs SET status = ?, finished = ? WHERE id = ? AND status = 'running'",
            (status, time.time(), run_id)))

    def flush(self) -> None:
        done = threading.Event()
        self._submit(_AfterCommit(done.set))
        done.wait(30)

    def list(self, *, limit: int, before: float | None) -> list[RunRecord]:
        query = "SELECT * FROM runs"
        args: tuple[Any, ...] = ()
        if before is not None:
            query += " WHERE created < ?"
            args = (before,)
        query += " ORDER BY created DESC LIMIT ?"
        with self._reader() as db:
            return [_record(row) for row in db.execute(query, (*args, limit))]

    def get(self, run_id: str) -> tuple[RunRecord, list[dict[str, Any]]] | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            events = [json.loads(data) for (data,) in
                      db.execute("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
        return _record(row), events

    def delete(self, run_id: str) -> bool:
        self.flush()
        with self._reader() as db:
            deleted = db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0
        (self.inputs / f"{run_id}.txt").unlink(missing_ok=True)
        return deleted

    def input_path(self, run_id: str) -> Path | None:
        path = self.inputs / f"{run_id}.txt"
        return path if path.exists() else None

    def _reader(self) -> sqlite3.Connection:
        db = self._connect()
        db.row_factory = sqlite3.Row
        return _Closing(db)  # type: ignore[return-value]

    def close(self) -> None:
        self._jobs.put(None)
        self._writer.join(10)


class _Closing:
    """`with` for a connection that also closes it (sqlite3's own `with` only commits)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc_info: object) -> None:
        self.db.close()


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"], created=row["created"], status=row["status"], prompt=row["prompt"],
        settings=json.loads(row["settings"]), input_chars=row["input_chars"], input_lines=row["input_lines"],
        input_bytes=row["input_bytes"], input_sha256=row["input_sha256"], input_name=row["input_name"],
        input_kept=bool(row["input_kept"]), finished=row["finished"], answer=row["answer"],
        ready=None if row["ready"] is None else bool(row["ready"]), iterations=row["iterations"],
        usage=json.loads(row["usage"]) if row["usage"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
    )
