"""Run history: every run and every event it streamed, kept so users can come back to them.

`RunStore` is the interface; `SqliteRunStore` the default, an embedded SQLite database. Writes go
through one thread of their own, so recording an event never blocks the event loop; reads open their
own connection. A run that was still `running` when the server stopped (a crash, a kill) is marked
`unfinished` when the store opens again: it is kept, not lost.

Each event is stored under its sequence number in the run (1, 2, 3…): the event's own `seq` when it has one,
otherwise the order it was recorded in.

What one run may store is bounded (`RunBudget`): its events are stored whole while their JSON fits in the
run's budget; past it, every long text in an event is stored cut, with a marker in the text and the original
lengths under the event's `stored_cut` key. The terminal event is always stored, its `answer` cut only past
the answer limit. The live stream is never cut: only what the history keeps. A delete gives the space back.

The input itself is stored only when the run asked for it (`keep_input`): it can be huge or private.
Then it is a file beside the database, `inputs/<run id>.txt`.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import shutil
import sqlite3
import threading
import time
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .events import TERMINAL_EVENTS, ErrorEvent, EventBase, FinalEvent, is_terminal
from .migrations import PREVIEW_CHARS, migrate_sqlite
from .storewriter import Job, Writer, WriteSkipped

log = logging.getLogger("rlm_service")

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a run id may be: the engine makes 16 hex characters; anything else names no run."""
READ_TIMEOUT_S = 5.0
DELETE_TIMEOUT_S = 10.0


def valid_run_id(run_id: str) -> bool:
    """Whether `run_id` could name a run (and is safe in a file name)."""
    return RUN_ID.fullmatch(run_id) is not None


class StoreUnavailable(Exception):
    """The history database cannot be written now (a full disk, an I/O error); the message says why."""


@dataclass
class RunRecord:
    """A run: what it was asked and how it ended."""

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
    session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunSummary:
    """A run as the history lists it: its prompt and answer as short previews, with their full lengths."""

    id: str
    created: float
    status: str
    prompt_preview: str
    prompt_chars: int
    settings: dict[str, Any]
    input_chars: int
    input_lines: int
    input_bytes: int
    input_sha256: str | None
    input_name: str | None
    input_kept: bool
    finished: float | None
    answer_preview: str | None
    answer_chars: int | None
    ready: bool | None
    iterations: int | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    session_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RunStore(Protocol):
    def begin(self, record: RunRecord) -> None:
        """A run started."""

    def keep_input(self, run_id: str, source: Path) -> None:
        """The run asked to keep its input: copy it in (runs in a thread; inputs can be large). A copy that
        fails (a full disk) is logged and leaves the run without a kept input; the run goes on."""

    def record(self, run_id: str, event: EventBase) -> None:
        """One event of a run, in order (not changed after it is recorded). Terminal events also close
        the run's record."""

    def abandon(self, run_id: str, status: str) -> None:
        """The run ended without a terminal event (cancelled by its client)."""

    def list(self, *, limit: int, before: float | None) -> list[RunSummary]:
        """Runs, newest first, created before `before` when given."""

    def get(self, run_id: str) -> tuple[RunRecord, builtins.list[dict[str, Any]]] | None:
        """A run and all its events (each with its `seq`), or None."""

    def events(self, run_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        """The run's stored events numbered above `after`, in order, each with its `seq`."""

    def status(self, run_id: str) -> str | None:
        """The run's status (`running`, `finished`, `failed`, `cancelled`, `unfinished`), or None if unknown."""

    def delete(self, run_id: str) -> bool:
        """Forget a run; False when there was none. Raises `StoreUnavailable` when the database cannot be
        written now."""

    def input_path(self, run_id: str) -> Path | None:
        """Where a kept input is, if it was kept."""

    def flush(self, timeout: float = 30) -> bool:
        """Wait until everything recorded so far is written; False if it was not within `timeout`, or the
        database is failing."""

    def close(self) -> None: ...


@dataclass
class RunBudget:
    """How much of one run the history keeps (see the module's docstring)."""

    event_bytes: int = 8 * 1024**2
    """JSON bytes of a run's events stored whole; past it, long texts are stored cut."""
    answer_chars: int = 4 * 1024**2
    """Characters of the terminal event's answer stored."""
    cut_to_chars: int = 1000
    """Characters kept of each long text in an event stored cut."""


class _Usage:
    """The writer thread's account of what each live run has stored so far."""

    def __init__(self, budget: RunBudget) -> None:
        self.budget = budget
        self.used: dict[str, int] = {}

    def stored(self, run_id: str, event: EventBase) -> str:
        """The event's JSON as the history keeps it."""
        whole = event.model_dump_json()
        size = len(whole.encode())
        if is_terminal(event):
            self.used.pop(run_id, None)
            answer = event.answer if isinstance(event, (FinalEvent, ErrorEvent)) else None
            if answer is None or len(answer) <= self.budget.answer_chars:
                return whole
            data = event.model_dump(mode="json")
            cut: dict[str, int] = {}
            data["answer"] = _cut(answer, self.budget.answer_chars, "answer", cut)
            return json.dumps({**data, "stored_cut": cut}, ensure_ascii=False)
        used = self.used.get(run_id, 0)
        if used + size <= self.budget.event_bytes:
            self.used[run_id] = used + size
            return whole
        cut = {}
        data = _cut(event.model_dump(mode="json"), self.budget.cut_to_chars, "", cut)
        text = json.dumps({**data, "stored_cut": cut} if cut else data, ensure_ascii=False)
        self.used[run_id] = used + len(text.encode())
        return text

    def forget(self, run_id: str) -> None:
        self.used.pop(run_id, None)


def _cut(value: Any, keep: int, path: str, cut: dict[str, int]) -> Any:
    """`value` with every string longer than `keep` cut to it and marked; `cut` gets each one's path and length."""
    if isinstance(value, str):
        if len(value) <= keep:
            return value
        cut[path] = len(value)
        return f"{value[:keep]} … [{len(value) - keep:,} more characters not kept in the history]"
    if isinstance(value, dict):
        return {key: _cut(item, keep, f"{path}.{key}" if path else key, cut) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item, keep, f"{path}.{index}", cut) for index, item in enumerate(value)]
    return value


class SqliteRunStore:
    """The default store: one SQLite file, one writer thread (`storewriter.Writer`)."""

    def __init__(self, path: Path, budget: RunBudget | None = None) -> None:
        self.path = path
        self.inputs = path.parent / "inputs"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(exist_ok=True)
        with closing(_connect_writer(path)) as db:
            migrate_sqlite(db)
            db.execute("UPDATE runs SET status = 'unfinished' WHERE status = 'running'")
        self._usage = _Usage(budget or RunBudget())
        self._seqs: dict[str, int] = {}
        self._seqs_lock = threading.Lock()
        self._writer = Writer(lambda: _connect_writer(path))

    @property
    def failure(self) -> str | None:
        """Why the database cannot be written at the moment, or None while writes succeed."""
        return self._writer.failure

    def begin(self, record: RunRecord) -> None:
        row = (record.id, record.created, record.status, json.dumps(record.settings), record.input_chars,
               record.input_lines, record.input_bytes, record.input_sha256, record.input_name,
               int(record.input_kept), record.prompt[:PREVIEW_CHARS], len(record.prompt), record.session_id)

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO runs (id, created, status, settings, input_chars, input_lines, input_bytes, "
                       "input_sha256, input_name, input_kept, prompt_preview, prompt_chars, session_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING", row)
            db.execute("INSERT INTO prompts (run_id, prompt) VALUES (?, ?) ON CONFLICT (run_id) DO NOTHING",
                       (record.id, record.prompt))

        self._writer.submit(Job(write))

    def keep_input(self, run_id: str, source: Path) -> None:
        if not valid_run_id(run_id):
            return
        target = self.inputs / f"{run_id}.txt"
        try:
            shutil.copyfile(source, target)
        except OSError as exc:
            target.unlink(missing_ok=True)
            log.warning("run history: the input of run %s was not kept: %s", run_id, exc)
            return
        self._writer.submit(Job(lambda db: db.execute("UPDATE runs SET input_kept = 1 WHERE id = ?", (run_id,))))

    def record(self, run_id: str, event: EventBase) -> None:
        terminal = is_terminal(event)
        with self._seqs_lock:
            last = self._seqs.get(run_id, 0)
            seq = event.seq if event.seq > 0 else last + 1
            if terminal:
                self._seqs.pop(run_id, None)
            else:
                self._seqs[run_id] = max(last, seq)
        write = _EventWrite(self._usage, run_id, seq, event)
        self._writer.submit(Job(write, prepare=write.prepare, droppable=not terminal))

    def abandon(self, run_id: str, status: str) -> None:
        with self._seqs_lock:
            self._seqs.pop(run_id, None)

        def write(db: sqlite3.Connection) -> None:
            self._usage.forget(run_id)
            db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ? AND status = 'running'",
                       (status, time.time(), run_id))

        self._writer.submit(Job(write))

    def flush(self, timeout: float = 30) -> bool:
        done: Future[object] = Future()
        self._writer.submit(Job(None, reply=done))
        return self._writer.wait(done, timeout, give_up_while_failing=True) is not None

    def list(self, *, limit: int, before: float | None) -> list[RunSummary]:
        query = f"SELECT {_SUMMARY_COLUMNS} FROM runs"
        args: tuple[Any, ...] = ()
        if before is not None:
            query += " WHERE created < ?"
            args = (before,)
        query += " ORDER BY created DESC LIMIT ?"
        with self._reader() as db:
            return [_summary(row) for row in db.execute(query, (*args, limit))]

    def get(self, run_id: str) -> tuple[RunRecord, builtins.list[dict[str, Any]]] | None:
        if not valid_run_id(run_id):
            return None
        with self._reader() as db:
            db.execute("BEGIN")  # one snapshot for the run, its prompt and its events
            row = db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            prompt = db.execute("SELECT prompt FROM prompts WHERE run_id = ?", (run_id,)).fetchone()
            events = _events(db, run_id, 0)
        answer = next((event.get("answer") for event in reversed(events) if event.get("type") in TERMINAL_EVENTS),
                      None)
        return _record(row, prompt[0] if prompt else "", answer), events

    def events(self, run_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        if not valid_run_id(run_id):
            return []
        with self._reader() as db:
            return _events(db, run_id, after)

    def status(self, run_id: str) -> str | None:
        if not valid_run_id(run_id):
            return None
        with self._reader() as db:
            row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    def delete(self, run_id: str) -> bool:
        if not valid_run_id(run_id):
            return False
        done: Future[object] = Future()

        def write(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0

        self._writer.submit(Job(write, reply=done, urgent=True, after=_reclaim))
        try:
            deleted = self._writer.wait(done, DELETE_TIMEOUT_S, give_up_while_failing=False)
        except WriteSkipped as exc:
            raise StoreUnavailable(f"the run history cannot be written now: {exc}") from None
        if deleted is None:
            raise StoreUnavailable("the run history did not answer in time; try again")
        (self.inputs / f"{run_id}.txt").unlink(missing_ok=True)
        return bool(deleted)

    def input_path(self, run_id: str) -> Path | None:
        if not valid_run_id(run_id):
            return None
        path = self.inputs / f"{run_id}.txt"
        return path if path.exists() else None

    def _reader(self) -> closing[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=READ_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        return closing(db)

    def close(self) -> None:
        self._writer.close()


class _EventWrite:
    """Writes one event. Its stored form is made once, by the writer thread, when it takes the job: that is
    where the run's budget is counted, and it lets the event itself go while the write waits."""

    def __init__(self, usage: _Usage, run_id: str, seq: int, event: EventBase) -> None:
        self.usage, self.run_id, self.seq = usage, run_id, seq
        self.event: EventBase | None = event
        self.kind = event.type
        self.data = ""
        self.close: tuple[str, tuple[Any, ...]] | None = None

    def prepare(self) -> None:
        event, self.event = self.event, None
        if event is None:
            return
        self.data = self.usage.stored(self.run_id, event)
        if isinstance(event, FinalEvent):
            self.close = ("UPDATE runs SET status = 'finished', finished = ?, ready = ?, iterations = ?, usage = ?, "
                          "answer_preview = ?, answer_chars = ? WHERE id = ?",
                          (time.time(), int(event.ready), event.iterations, event.usage.model_dump_json(),
                           event.answer[:PREVIEW_CHARS], len(event.answer), self.run_id))
        elif isinstance(event, ErrorEvent):
            error = json.dumps({"code": event.code, "message": event.message})
            answer = event.answer
            status = "cancelled" if event.code == "cancelled" else "failed"
            self.close = ("UPDATE runs SET status = ?, finished = ?, error = ?, answer_preview = ?, "
                          "answer_chars = ? WHERE id = ?",
                          (status, time.time(), error, None if answer is None else answer[:PREVIEW_CHARS],
                           None if answer is None else len(answer), self.run_id))

    def __call__(self, db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO events (run_id, seq, type, data) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (run_id, seq) DO NOTHING", (self.run_id, self.seq, self.kind, self.data))
        if self.close is not None:
            db.execute(*self.close)


def _connect_writer(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=READ_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_size_limit = 4194304")  # a checkpointed WAL shrinks back to 4 MiB
    return db


def _reclaim(db: sqlite3.Connection, deleted: object) -> None:
    """After a delete: hand the freed pages back to the file system."""
    if deleted:
        db.executescript("PRAGMA incremental_vacuum")  # `execute` would step it once: one page
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


_SUMMARY_COLUMNS = ("id, created, finished, status, prompt_preview, prompt_chars, settings, input_chars, input_lines, "
                    "input_bytes, input_sha256, input_name, input_kept, answer_preview, answer_chars, ready, "
                    "iterations, usage, error, session_id")


def _events(db: sqlite3.Connection, run_id: str, after: int) -> list[dict[str, Any]]:
    rows = db.execute("SELECT seq, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, after))
    return [{**json.loads(data), "seq": seq} for seq, data in rows]


def _summary(row: sqlite3.Row) -> RunSummary:
    return RunSummary(
        id=row["id"], created=row["created"], status=row["status"], prompt_preview=row["prompt_preview"],
        prompt_chars=row["prompt_chars"], settings=json.loads(row["settings"]), input_chars=row["input_chars"],
        input_lines=row["input_lines"], input_bytes=row["input_bytes"], input_sha256=row["input_sha256"],
        input_name=row["input_name"], input_kept=bool(row["input_kept"]), finished=row["finished"],
        answer_preview=row["answer_preview"], answer_chars=row["answer_chars"],
        ready=None if row["ready"] is None else bool(row["ready"]), iterations=row["iterations"],
        usage=json.loads(row["usage"]) if row["usage"] else None,
        error=json.loads(row["error"]) if row["error"] else None, session_id=row["session_id"],
    )


def _record(row: sqlite3.Row, prompt: str, answer: str | None) -> RunRecord:
    summary = _summary(row)
    return RunRecord(
        id=summary.id, created=summary.created, status=summary.status, prompt=prompt, settings=summary.settings,
        input_chars=summary.input_chars, input_lines=summary.input_lines, input_bytes=summary.input_bytes,
        input_sha256=summary.input_sha256, input_name=summary.input_name, input_kept=summary.input_kept,
        finished=summary.finished, answer=answer, ready=summary.ready, iterations=summary.iterations,
        usage=summary.usage, error=summary.error, session_id=summary.session_id,
    )
