"""What the SQL stores share: every write through one writer thread (`storewriter.Writer`), every read, the
sequence numbers of events and what one run may store. Each store gives its connections (`Db`), how it reads,
and where kept inputs live; the SQL here runs unchanged on SQLite and PostgreSQL.

When several processes share the database (fleet.py), the store records which process runs each run (`owner`),
and a run's events are written only while the run is `running` in the database: once another process has
ended it as `lost` (its process was taken for dead), nothing more is added after that terminal event. A
process alone on its database writes as it always did.
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .events import TERMINAL_EVENTS, ErrorEvent, EventBase, FinalEvent, is_terminal, valid_unicode_json
from .migrations import PREVIEW_CHARS, Dialect
from .store import KeptInput, RunBudget, RunRecord, RunStillLive, RunSummary, StoreUnavailable, valid_run_id
from .storewriter import Db, Job, Writer, WriteSkipped, in_transaction

DELETE_TIMEOUT_S = 10.0
PAGE_ROWS = 256
"""The most events in one page of `events_page`."""
T = TypeVar("T")


class SqlRunStore(ABC):
    """A `RunStore` on an SQL database; a subclass says how to reach it."""

    dialect: ClassVar[Dialect]
    share_lock: ClassVar[str] = ""
    """What a write of events adds to its check that the run is still live, so that the check holds until it
    commits: PostgreSQL's `FOR SHARE` (a sweeper ending the run waits, or passes it by). SQLite's writes never
    interleave: nothing."""

    def __init__(
        self,
        connect: Callable[[], Db],
        budget: RunBudget | None,
        announce: Callable[[Db, list[str]], None] | None = None,
    ) -> None:
        """`announce`: told, in the transaction that writes them, which runs have new events."""
        self._usage = _Usage(budget or RunBudget())
        self._seqs: dict[str, int] = {}
        self._seqs_lock = threading.Lock()
        self._connect = connect
        self._writer = Writer(connect, announce)
        self.shared = False
        """Whether other processes share the database (fleet.py): then a run's events are written only while it
        is `running` there."""
        self.owner: str | None = None
        """The process that runs the runs begun from now on, when several share the database."""

    @abstractmethod
    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[Db]:
        """A connection to read with; `snapshot`: every query through it sees the same state of the database."""

    @abstractmethod
    def _transient(self, exc: BaseException) -> bool:
        """Whether a failure to read may pass by itself (the database cannot be reached now)."""

    @abstractmethod
    def keep_input(self, run_id: str, source: Path) -> None: ...

    @abstractmethod
    def read_input(self, run_id: str) -> KeptInput | None: ...

    @abstractmethod
    def _reclaim(self, db: Db, deleted: object) -> None:
        """After a committed delete, with its result: hand the freed space back, where the database needs it."""

    @abstractmethod
    def _after_delete(self, run_id: str) -> None:
        """Once a run's rows are deleted: forget what else the store keeps of it."""

    @property
    def failure(self) -> str | None:
        """Why the database cannot be written at the moment, or None while writes succeed."""
        return self._writer.failure

    def begin(self, record: RunRecord) -> None:
        row = (
            record.id,
            record.created,
            record.status,
            json.dumps(record.settings),
            record.input_chars,
            record.input_lines,
            record.input_bytes,
            record.input_sha256,
            record.input_name,
            int(record.input_kept),
            record.prompt[:PREVIEW_CHARS],
            len(record.prompt),
            record.session_id,
            self.owner,
        )

        def write(db: Db) -> None:
            db.execute(
                "INSERT INTO runs (id, created, status, settings, input_chars, input_lines, input_bytes, "
                "input_sha256, input_name, input_kept, prompt_preview, prompt_chars, session_id, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                row,
            )
            db.execute(
                "INSERT INTO prompts (run_id, prompt) VALUES (?, ?) ON CONFLICT (run_id) DO NOTHING",
                (record.id, record.prompt),
            )

        self._writer.submit(Job(write))

    def record(self, run_id: str, event: EventBase) -> None:
        terminal = is_terminal(event)
        with self._seqs_lock:
            last = self._seqs.get(run_id, 0)
            seq = event.seq if event.seq > 0 else last + 1
            if terminal:
                self._seqs.pop(run_id, None)
            else:
                self._seqs[run_id] = max(last, seq)
        write = _EventWrite(self._usage, run_id, seq, event, lock=self.share_lock if self.shared else None)
        self._writer.submit(Job(write, prepare=write.prepare, droppable=not terminal, news=run_id))

    def abandon(self, run_id: str, status: str) -> None:
        with self._seqs_lock:
            self._seqs.pop(run_id, None)

        def write(db: Db) -> None:
            self._usage.forget(run_id)
            db.execute(
                "UPDATE runs SET status = ?, finished = ? WHERE id = ? AND status = 'running'",
                (status, time.time(), run_id),
            )

        self._writer.submit(Job(write))

    def flush(self, timeout: float = 30) -> bool:
        done: Future[object] = Future()
        self._writer.submit(Job(None, reply=done))
        return self._writer.wait(done, timeout, give_up_while_failing=True) is not None

    def delete(self, run_id: str) -> bool:
        if not valid_run_id(run_id):
            return False
        done: Future[object] = Future()
        live = False

        def write(db: Db) -> bool:
            nonlocal live
            live = False  # the writer may run a job twice (once in a batch that failed for another's reason)
            for _ in range(2):  # twice: on PostgreSQL the run may end between the two statements
                if db.execute("DELETE FROM runs WHERE id = ? AND status <> 'running'", (run_id,)) > 0:
                    return True
                found = db.rows("SELECT status FROM runs WHERE id = ?", (run_id,))
                if not found:
                    return False
                live = found[0]["status"] == "running"
                if live:
                    return False
            return False

        self._writer.submit(Job(write, reply=done, urgent=True, after=self._reclaim))
        try:
            deleted = self._writer.wait(done, DELETE_TIMEOUT_S, give_up_while_failing=False)
        except WriteSkipped as exc:
            raise StoreUnavailable(f"the run history cannot be written now: {exc}") from None
        if deleted is None:
            raise StoreUnavailable("the run history did not answer in time; try again")
        if live:
            raise RunStillLive(run_id)
        self._after_delete(run_id)
        return bool(deleted)

    def list(self, *, limit: int, before: float | None, before_id: str | None = None) -> list[RunSummary]:
        query = f"SELECT {_SUMMARY_COLUMNS} FROM runs"
        args: tuple[Any, ...] = ()
        if before is not None and before_id is not None:
            # created < before, or created = before and id < before_id: as a row value, which both databases
            # answer from the index on (created DESC, id DESC) without sorting what precedes the page
            query += " WHERE (created, id) < (?, ?)"
            args = (before, before_id)
        elif before is not None:
            query += " WHERE created < ?"
            args = (before,)
        query += " ORDER BY created DESC, id DESC LIMIT ?"
        with self._reading() as db:
            return [_summary(row) for row in db.rows(query, (*args, limit))]

    def get(self, run_id: str) -> tuple[RunRecord, builtins.list[dict[str, Any]]] | None:
        if not valid_run_id(run_id):
            return None
        with self._reading(snapshot=True) as db:  # one state of the run, its prompt and its events
            rows = db.rows(f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE id = ?", (run_id,))
            if not rows:
                return None
            prompt = db.rows("SELECT prompt FROM prompts WHERE run_id = ?", (run_id,))
            events = _events(db, run_id, 0)
        answer = next((event.get("answer") for event in reversed(events) if event.get("type") in TERMINAL_EVENTS), None)
        return _record(rows[0], prompt[0]["prompt"] if prompt else "", answer), events

    def events(self, run_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        if not valid_run_id(run_id):
            return []
        with self._reading() as db:
            return _events(db, run_id, after)

    def events_page(self, run_id: str, after: int, max_chars: int) -> tuple[builtins.list[dict[str, Any]], bool]:
        if not valid_run_id(run_id):
            return [], False
        with self._reading() as db:
            # The sizes first, then the texts of the page only; at most PAGE_ROWS events a page.
            sizes = db.rows(
                "SELECT seq, LENGTH(data) AS size FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after, PAGE_ROWS),
            )
            total, last = 0, after
            for row in sizes:
                if total >= max_chars:
                    break
                total, last = total + int(row["size"]), int(row["seq"])
            rows = _events(db, run_id, after, last) if sizes else []
        return rows, len(rows) < len(sizes) or len(sizes) == PAGE_ROWS

    def last_event(self, run_id: str) -> dict[str, Any] | None:
        if not valid_run_id(run_id):
            return None
        with self._reading() as db:
            rows = db.rows("SELECT seq, data FROM events WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,))
        return {**json.loads(rows[0]["data"]), "seq": rows[0]["seq"]} if rows else None

    def status(self, run_id: str) -> str | None:
        if not valid_run_id(run_id):
            return None
        with self._reading() as db:
            rows = db.rows("SELECT status FROM runs WHERE id = ?", (run_id,))
        return str(rows[0]["status"]) if rows else None

    def queue(self, write: Callable[[Db], object]) -> None:
        """A write of the processes' coordination (fleet.py), in order with the history's own."""
        self._writer.submit(Job(write))

    def transaction(self, work: Callable[[Db], T]) -> T:
        """`work` in one transaction on a reading connection (not the writer's queue), for the coordination of
        processes; raises `StoreUnavailable` when the database cannot be reached now."""
        with self._reading() as db:
            return in_transaction(db, work)

    def query(self, work: Callable[[Db], T]) -> T:
        """`work` on a reading connection, outside any transaction of its own; raises `StoreUnavailable` as
        `transaction` does."""
        with self._reading() as db:
            return work(db)

    def connection(self) -> Db:
        """A new connection of its own, as the writer's (the caller closes it)."""
        return self._connect()

    def close(self) -> None:
        self._writer.close()

    @contextmanager
    def _reading(self, *, snapshot: bool = False) -> Iterator[Db]:
        """`_read`, its transient failures raised as `StoreUnavailable`."""
        try:
            with self._read(snapshot=snapshot) as db:
                yield db
        except Exception as exc:
            if isinstance(exc, StoreUnavailable) or not self._transient(exc):
                raise
            raise StoreUnavailable(f"the run history cannot be read now: {type(exc).__name__}: {exc}") from None


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


class _EventWrite:
    """Writes one event. Its stored form is made once, by the writer thread, when it takes the job: that is
    where the run's budget is counted, and it lets the event itself go while the write waits."""

    def __init__(self, usage: _Usage, run_id: str, seq: int, event: EventBase, *, lock: str | None) -> None:
        """`lock`: None when this process is alone on the database, else `SqlRunStore.share_lock`."""
        self.usage, self.run_id, self.seq, self.lock = usage, run_id, seq, lock
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
            self.close = (
                "UPDATE runs SET status = 'finished', finished = ?, ready = ?, iterations = ?, usage = ?, "
                "answer_preview = ?, answer_chars = ? WHERE id = ?",
                (
                    time.time(),
                    int(event.ready),
                    event.iterations,
                    event.usage.model_dump_json(),
                    event.answer[:PREVIEW_CHARS],
                    len(event.answer),
                    self.run_id,
                ),
            )
        elif isinstance(event, ErrorEvent):
            error = json.dumps({"code": event.code, "message": event.message})
            answer = event.answer
            status = "cancelled" if event.code == "cancelled" else "failed"
            self.close = (
                "UPDATE runs SET status = ?, finished = ?, error = ?, answer_preview = ?, "
                "answer_chars = ? WHERE id = ?",
                (
                    status,
                    time.time(),
                    error,
                    None if answer is None else answer[:PREVIEW_CHARS],
                    None if answer is None else len(answer),
                    self.run_id,
                ),
            )

    def __call__(self, db: Db) -> None:
        row = (self.run_id, self.seq, self.kind, self.data)
        if self.lock is None:
            db.execute(
                "INSERT INTO events (run_id, seq, type, data) VALUES (?, ?, ?, ?) ON CONFLICT (run_id, seq) DO NOTHING",
                row,
            )
            if self.close is not None:
                db.execute(*self.close)
            return
        # Another process may have ended the run (`lost`): then it takes no more events.
        db.execute(
            "INSERT INTO events (run_id, seq, type, data) SELECT ?, ?, ?, ? WHERE EXISTS "
            f"(SELECT 1 FROM runs WHERE id = ? AND status = 'running'{self.lock}) "
            "ON CONFLICT (run_id, seq) DO NOTHING",
            (*row, self.run_id),
        )
        if self.close is not None:
            db.execute(self.close[0] + " AND status = 'running'", self.close[1])


_SUMMARY_COLUMNS = (
    "id, created, finished, status, prompt_preview, prompt_chars, settings, input_chars, input_lines, "
    "input_bytes, input_sha256, input_name, input_kept, answer_preview, answer_chars, ready, "
    "iterations, usage, error, session_id"
)


def _events(db: Db, run_id: str, after: int, through: int | None = None) -> list[dict[str, Any]]:
    if through is None:
        rows = db.rows("SELECT seq, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, after))
    else:
        query = "SELECT seq, data FROM events WHERE run_id = ? AND seq > ? AND seq <= ? ORDER BY seq"
        rows = db.rows(query, (run_id, after, through))
    return [{**json.loads(row["data"]), "seq": row["seq"]} for row in rows]


def _summary(row: Mapping[str, Any]) -> RunSummary:
    return RunSummary(
        id=row["id"],
        created=row["created"],
        status=row["status"],
        prompt_preview=row["prompt_preview"],
        prompt_chars=row["prompt_chars"],
        # JSON-escaped lone surrogates, as older versions stored them from a request's answer schema
        settings=valid_unicode_json(json.loads(row["settings"])),
        input_chars=row["input_chars"],
        input_lines=row["input_lines"],
        input_bytes=row["input_bytes"],
        input_sha256=row["input_sha256"],
        input_name=row["input_name"],
        input_kept=bool(row["input_kept"]),
        finished=row["finished"],
        answer_preview=row["answer_preview"],
        answer_chars=row["answer_chars"],
        ready=None if row["ready"] is None else bool(row["ready"]),
        iterations=row["iterations"],
        usage=json.loads(row["usage"]) if row["usage"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        session_id=row["session_id"],
    )


def _record(row: Mapping[str, Any], prompt: str, answer: str | None) -> RunRecord:
    """The whole run: its summary's fields, with the full prompt and answer in place of their previews."""
    shared = {name: value for name, value in vars(_summary(row)).items() if name in _RECORD_FIELDS}
    return RunRecord(**shared, prompt=prompt, answer=answer)


_RECORD_FIELDS = {field.name for field in fields(RunRecord)} - {"prompt", "answer"}
