"""The history store: schema upgrades, event numbers, what one run may store, and space given back. The tests of
behaviour run on both stores (`store_factory`: SQLite, and PostgreSQL on a real server)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from rlm_service import fleet_sql, followers, streaming
from rlm_service.events import (
    AnswerEvent,
    CodeEvent,
    ErrorEvent,
    EventBase,
    FinalEvent,
    InputInfo,
    RunLimits,
    RunUsage,
    StartEvent,
    ThoughtEvent,
)
from rlm_service.migrations import LATEST, MIGRATIONS, SchemaTooNew, migrate_sqlite
from rlm_service.store import RunBudget, RunRecord, off_loop
from rlm_service.store_postgres import PostgresRunStore
from rlm_service.store_sql import SqlRunStore
from rlm_service.store_sqlite import SqliteRunStore
from tests.conftest import run_record

StoreFactory = Callable[..., SqlRunStore]

# The schema and the writes of the store before schema versions existed (version 0), copied as they were.
SCHEMA_V0 = """
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
BEGIN_V0 = (
    "INSERT INTO runs (id, created, status, prompt, settings, input_chars, input_lines, input_bytes, "
    "input_sha256, input_name, input_kept) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
EVENT_V0 = (
    "INSERT INTO events (run_id, seq, type, data) VALUES "
    "(?, (SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE run_id = ?), ?, ?)"
)
FINAL_V0 = (
    "UPDATE runs SET status = 'finished', finished = ?, answer = ?, ready = ?, iterations = ?, usage = ? WHERE id = ?"
)
ERROR_V0 = "UPDATE runs SET status = 'failed', finished = ?, answer = ?, error = ? WHERE id = ?"


def _limits() -> RunLimits:
    return RunLimits(max_iterations=5, max_subcalls=10, exec_timeout_s=30, subcall_concurrency=4, max_output_chars=800)


def _start(run_id: str) -> StartEvent:
    return StartEvent(run_id=run_id, model="m", sub_model="s", input=InputInfo(chars=3, lines=1), limits=_limits())


def _final(run_id: str, answer: str) -> FinalEvent:
    return FinalEvent(run_id=run_id, answer=answer, ready=True, iterations=1, usage=RunUsage(), elapsed_ms=5)


def _write_old_runs(execute: Callable[[str, tuple[object, ...]], object]) -> dict[str, list[str]]:
    """Three runs (finished, failed, still running) written with the statements of the store before version 2,
    through `execute` (SQL with `?` parameters). Returns each run's event JSON, in order."""
    runs = {
        "f00d000000000001": (1000.0, "finished run " + "p" * 500),
        "f00d000000000002": (1001.0, "failed run"),
        "f00d000000000003": (1002.0, "run the server lost"),
    }
    for run_id, (created, prompt) in runs.items():
        execute(
            BEGIN_V0,
            (run_id, created, "running", prompt, json.dumps({"keep_input": False}), 3, 1, 3, "abc", "in.txt", 0),
        )
    stored: dict[str, list[str]] = {run_id: [] for run_id in runs}

    def event(run_id: str, item: object) -> None:
        data = item.model_dump_json()  # type: ignore[attr-defined]
        execute(EVENT_V0, (run_id, run_id, item.type, data))  # type: ignore[attr-defined]
        stored[run_id].append(data)

    finished, failed, _ = runs
    for run_id in runs:
        event(run_id, _start(run_id))
        event(run_id, ThoughtEvent(run_id=run_id, iteration=1, text="looking"))
        event(run_id, CodeEvent(run_id=run_id, iteration=1, code="print(1)"))
    answer = "the answer " + "a" * 300
    event(finished, AnswerEvent(run_id=finished, content=answer, ready=True))
    event(finished, _final(finished, answer))
    execute(FINAL_V0, (1010.0, answer, 1, 1, RunUsage().model_dump_json(), finished))
    event(failed, ErrorEvent(run_id=failed, code="timeout", message="The run took too long.", answer="half"))
    execute(ERROR_V0, (1011.0, "half", json.dumps({"code": "timeout", "message": "The run took too long."}), failed))
    return stored


def _make_v0_database(path: Path) -> dict[str, list[str]]:
    """A database as the SQLite store made it before schema versions, with `_write_old_runs`."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA_V0)
    stored = _write_old_runs(db.execute)
    db.close()
    return stored


def _check_upgraded(store: SqlRunStore, old: dict[str, list[str]], *, lost_status: str) -> None:
    """Every run and event of `_write_old_runs` reads back as today's store writes them, and recording goes on."""
    finished, failed, lost = old
    listed = {run.id: run for run in store.list(limit=10, before=None)}
    assert list(listed) == [lost, failed, finished]
    assert listed[finished].prompt_preview == ("finished run " + "p" * 500)[:200]
    assert listed[finished].prompt_chars == len("finished run ") + 500
    assert listed[finished].answer_chars == len("the answer ") + 300 and listed[finished].status == "finished"
    assert listed[failed].status == "failed" and listed[failed].error == {
        "code": "timeout",
        "message": "The run took too long.",
    }
    assert listed[lost].status == lost_status
    for run_id, events in old.items():
        record, stored = store.get(run_id)  # type: ignore[misc]
        assert [event.pop("seq") for event in stored] == list(range(1, len(events) + 1))
        assert stored == [{k: v for k, v in json.loads(data).items() if k != "seq"} for data in events]
        assert record.input_name == "in.txt" and record.settings == {"keep_input": False}
    record, _ = store.get(finished)  # type: ignore[misc]
    assert record.prompt == "finished run " + "p" * 500 and record.answer == "the answer " + "a" * 300
    assert record.ready is True and record.usage == RunUsage().model_dump()
    assert store.get(failed)[0].answer == "half"  # type: ignore[index]
    assert [event["type"] for event in store.events(finished, after=3)] == ["answer", "final"]
    store.begin(run_record("f00d000000000004", 1003.0))  # and it goes on recording
    store.record("f00d000000000004", _start("f00d000000000004"))
    assert store.flush()
    assert [event["seq"] for event in store.events("f00d000000000004")] == [1]


def test_a_database_made_by_the_unversioned_schema_upgrades_with_every_run_and_event(tmp_path: Path) -> None:
    """Mutants: dropping migration 2 (old events keep their numbers from 0: readers miss each run's first one);
    dropping the copy of prompts in migration 3 (the full prompts are lost)."""
    path = tmp_path / "history.sqlite3"
    old = _make_v0_database(path)
    store = SqliteRunStore(path)
    _check_upgraded(store, old, lost_status="unfinished")
    store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        # the list's order, (created, id), has its index (`INDEXES`), which replaced the one on created alone
        indexes = {row[1] for row in db.execute("PRAGMA index_list(runs)")}
        assert "runs_created_id" in indexes and "runs_created" not in indexes
    again = SqliteRunStore(path)  # opening an up-to-date database changes nothing
    finished, failed, lost = old
    assert [run.id for run in again.list(limit=10, before=None)][1:] == [lost, failed, finished]
    again.close()


def _as_the_last_release_left_it(execute: Callable[[str], object]) -> None:
    """The indexes of `runs` as the release before `INDEXES` made them (at the same schema version)."""
    execute("DROP INDEX IF EXISTS runs_created_id")
    execute("CREATE INDEX runs_created ON runs (created DESC)")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_lists_index_changes_without_a_new_schema_version(
    request: pytest.FixtureRequest, database: str, tmp_path: Path
) -> None:
    """A database at the latest version, with the indexes the release before left (on `created` alone), gets
    the index on (created, id) when it is opened, and keeps its version: servers of that release still open it
    (a rolling deploy, a rollback). Old behaviour (the index in a step 9): the version became 9, which they refuse."""
    if database == "sqlite":
        path = tmp_path / "h.sqlite3"
        SqliteRunStore(path).close()
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            _as_the_last_release_left_it(db.execute)
        SqliteRunStore(path).close()
        with closing(sqlite3.connect(path)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            indexes = {str(row[1]) for row in db.execute("PRAGMA index_list(runs)")}
    else:
        url = request.getfixturevalue("pg_url")
        PostgresRunStore(url).close()
        with psycopg.connect(url, autocommit=True) as pg:
            _as_the_last_release_left_it(pg.execute)  # type: ignore[arg-type]
        PostgresRunStore(url).close()
        with psycopg.connect(url) as pg:
            version = pg.execute("SELECT version FROM schema_version").fetchall()[0][0]
            rows = pg.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'runs'").fetchall()
            indexes = {str(row[0]) for row in rows}
    assert version == 8  # the version the release before knows
    assert "runs_created_id" in indexes and "runs_created" not in indexes


def _make_v1_postgresql(url: str) -> dict[str, list[str]]:
    """A PostgreSQL database at schema version 1 (its step as this code has it), with `_write_old_runs`."""
    with psycopg.connect(url, autocommit=True) as db:
        for statement in MIGRATIONS[0].statements("postgresql"):
            db.execute(statement)  # type: ignore[arg-type]
        db.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (id, version) VALUES (1, 1)")
        return _write_old_runs(lambda sql, params: db.execute(sql.replace("?", "%s"), params))  # type: ignore[arg-type]


def test_a_postgresql_database_at_version_1_upgrades_with_every_run_and_event(pg_url: str, tmp_path: Path) -> None:
    """The same runs as the SQLite upgrade above, on PostgreSQL; then the upgraded database keeps a run's input
    and its session; the run its server left running is `unfinished`, as SQLite's store has it. Mutants: dropping
    migration 2, or the copy of prompts in migration 3 (as above); dropping migration 6 (the input is not kept);
    dropping migration 8 (the run stays `running` for ever: no process owns it to end it)."""
    old = _make_v1_postgresql(pg_url)
    store = PostgresRunStore(pg_url)
    _check_upgraded(store, old, lost_status="unfinished")
    source = tmp_path / "input.txt"
    source.write_bytes("é".encode() * 700_000)  # two chunks
    store.keep_input("f00d000000000004", source)
    kept = store.read_input("f00d000000000004")
    assert kept is not None and kept.size == 1_400_000 and b"".join(kept.chunks) == source.read_bytes()
    store.begin(
        RunRecord(
            id="f00d000000000005",
            created=1004.0,
            status="running",
            prompt="again",
            settings={},
            input_chars=0,
            input_lines=0,
            input_bytes=0,
            session_id="s1",
        )
    )
    assert store.flush() and store.list(limit=1, before=None)[0].session_id == "s1"
    store.close()
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(LATEST,)]
        indexes = {row[0] for row in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'runs'")}
        assert "runs_created_id" in indexes and "runs_created" not in indexes
    again = PostgresRunStore(pg_url)  # opening an up-to-date database changes nothing
    finished, failed, lost = old
    assert [run.id for run in again.list(limit=10, before=None)][2:] == [lost, failed, finished]
    again.close()


def test_replicas_that_start_together_upgrade_a_new_postgresql_database_once(pg_url: str) -> None:
    """Four stores open one empty database at the same moment; every one opens, and the schema is made once.
    Mutant: `migrate_postgresql` without its advisory lock (two make the same table: one fails)."""
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresRunStore(pg_url), range(4)))
    for store in stores:
        assert store.list(limit=1, before=None) == []
        store.close()
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(LATEST,)]


def test_a_new_sqlite_file_opens_while_another_process_is_writing_it(tmp_path: Path) -> None:
    """Two server processes open a new history file together and one migrates it while the other switches it
    to WAL: SQLite refuses that switch at once, without waiting, while another connection writes (one server
    process in twenty failed to start that way under load, and was restarted). Here a write transaction holds
    the new file for a second while the store opens: it waits and opens. Mutant: one `PRAGMA journal_mode = WAL`
    (`database is locked` at once)."""
    path = tmp_path / "history.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: (time.sleep(1), other.execute("COMMIT"), other.close()))
        store = SqliteRunStore(path, shared=True)
    assert store.list(limit=1, before=None) == []
    store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_process_overtaken_during_a_step_outside_a_transaction_still_opens_a_new_file(tmp_path: Path) -> None:
    """Two server processes start on a new history file: one is running the step SQLite cannot run in a
    transaction (`VACUUM`) while the other takes the file through every later step. The first then goes on,
    and the file ends at the latest version with each step made once. (Seen: 6 starts in 60 of two processes on
    a new file failed with `duplicate column name: session_id`; the connections the failed process had taken
    were reset.) Mutant caught: that step's version recorded without a check under the write lock (the version
    went back, and the later steps ran again)."""
    path = tmp_path / "history.sqlite3"
    overtaken: list[int] = []

    class Overtaken(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "VACUUM" and not overtaken:
                with closing(sqlite3.connect(path, isolation_level=None)) as other:
                    overtaken.append(migrate_sqlite(other))
            return super().execute(sql, *args)

    with closing(sqlite3.connect(path, isolation_level=None, factory=Overtaken)) as db:
        assert migrate_sqlite(db) == 0
        assert overtaken == [3]  # the other found steps 1 to 3 made, and made the rest
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST
    store = SqliteRunStore(path)
    assert store.list(limit=1, before=None) == []
    store.close()


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(SchemaTooNew, match="upgrade the service"):
        SqliteRunStore(path)


def test_a_postgresql_database_from_a_newer_version_is_refused(pg_url: str) -> None:
    PostgresRunStore(pg_url).close()
    with psycopg.connect(pg_url) as db:
        db.execute("UPDATE schema_version SET version = %s", (LATEST + 1,))
    with pytest.raises(SchemaTooNew, match="RLM_DATABASE_URL"):
        PostgresRunStore(pg_url)


class _Numbered(CodeEvent):
    seq: int


def test_events_are_numbered_from_one_and_read_after_the_last_one_seen(store_factory: StoreFactory) -> None:
    """An event's own `seq` is its number; without one, the next in the run. Mutant: numbering from 0."""
    store = store_factory()
    run_id = "0123456789abcdef"
    store.begin(run_record(run_id, 1.0))
    assert store.flush() and store.status(run_id) == "running"
    store.record(run_id, _start(run_id))
    store.record(run_id, CodeEvent(run_id=run_id, iteration=1, code="a"))
    store.record(run_id, _Numbered(run_id=run_id, iteration=1, code="b", seq=7))
    store.record(run_id, CodeEvent(run_id=run_id, iteration=2, code="c"))
    store.record(run_id, _final(run_id, "done"))
    assert store.flush()
    assert [(event["seq"], event["type"]) for event in store.events(run_id)] == [
        (1, "start"),
        (2, "code"),
        (7, "code"),
        (8, "code"),
        (9, "final"),
    ]
    assert [event.get("code") for event in store.events(run_id, after=2)] == ["b", "c", None]
    assert store.events(run_id, after=9) == [] and store.status(run_id) == "finished"
    assert store.status("feedfacefeedface") is None and store.events("feedfacefeedface") == []
    assert store.status("../" + run_id) is None and store.get("x" * 5000) is None
    store.close()


def test_events_are_read_a_page_at_a_time(store_factory: StoreFactory) -> None:
    """A stream reads a run's events in pages of about `max_chars` of their stored text: events up to the one that
    brings the page past it (a larger event makes a page of its own), and says whether more may follow."""
    store = store_factory()
    run_id = "0123456789abcdef"
    store.begin(run_record(run_id, 1.0))
    store.record(run_id, _start(run_id))
    for index in range(6):
        store.record(run_id, CodeEvent(run_id=run_id, iteration=index + 1, code=str(index) * 100_000))
    store.record(run_id, _final(run_id, "done"))
    assert store.flush()
    pages, after, full = [], 0, True
    while full:
        rows, full = store.events_page(run_id, after, 250_000)
        pages.append([event["seq"] for event in rows])
        after = rows[-1]["seq"] if rows else after
    assert pages == [[1, 2, 3, 4], [5, 6, 7], [8]]
    assert [row["seq"] for row in store.events_page(run_id, 0, 10)[0]] == [1]
    assert store.events_page(run_id, 8, 250_000) == ([], False)
    assert store.events_page("feedfacefeedface", 0, 250_000) == ([], False)
    store.close()


def _run_with_a_cell(store: SqlRunStore) -> str:
    """A running run with its `start` and one `code` event stored; its id."""
    run_id = "0123456789abcdef"
    store.begin(run_record(run_id, 1.0))
    store.record(run_id, _start(run_id))
    store.record(run_id, CodeEvent(run_id=run_id, iteration=1, code="a"))
    assert store.flush()
    return run_id


async def _follow(store: SqlRunStore, run_id: str, after: int) -> list[EventBase]:
    """Every event a follower in another process streams of the run after `after`."""
    follower = followers.StoreFollower(store, followers.Wakeups(), lambda: 0.01)
    return [event async for event in follower.follow(run_id, after=after)]


@pytest.mark.parametrize("ending", ["unfinished", "deleted"])
def test_a_follower_of_a_run_that_ends_without_a_terminal_event_gets_lost(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Following a run (as another process does, through the store) whose process stopped before it wrote a
    terminal event, or that was then deleted: the stream still ends with one terminal event, `error` `lost`.
    Mutant: the follower returning at the status check without it (the stream ends after `code`)."""
    monkeypatch.setattr(followers, "RECHECK_S", 0.0)  # check the run's status at every turn, not every 5 s
    store = store_factory()
    run_id = _run_with_a_cell(store)
    store.abandon(run_id, "unfinished")
    if ending == "deleted":  # a running run cannot be deleted: one its process left unfinished can
        assert store.flush() and store.delete(run_id)
    assert store.flush()

    async def follow() -> list[EventBase]:
        return await _follow(store, run_id, after=1 if ending == "unfinished" else 0)

    seen = asyncio.run(asyncio.wait_for(follow(), 30))
    expected = ["code", "error"] if ending == "unfinished" else ["error"]
    assert [event.type for event in seen] == expected
    assert isinstance(seen[-1], ErrorEvent) and seen[-1].code == "lost" and seen[-1].seq == (3 if seen[:-1] else 1)
    assert ending in seen[-1].message
    store.close()


@pytest.mark.parametrize("after", [4, 6])
def test_a_client_that_saw_events_its_dead_server_never_stored_still_gets_lost(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """A server streams events to its client before its writer stores them. Killed in between, it leaves the
    client holding events numbered past the stored ones; the sweep then stores `lost` after the stored ones
    (here: 3 stored, the last a draft answer, `lost` stored as 4 with that answer; the client saw up to 4 or 6).
    The client re-attaches to another process after the last event it saw, and must still get the stored `lost`,
    numbered after it: through a follower while the run was live when the stream began, and from history once it
    has ended. Mutants: the follower's "nothing after the end" check also for such runs (the stream ended with no
    terminal event; B12's smoke test saw it on a busy machine); a new `lost` in place of the stored one (without
    the answer, as the review found)."""
    monkeypatch.setattr(followers, "RECHECK_S", 0.0)
    store = store_factory()
    run_id = _run_with_a_cell(store)
    store.record(run_id, AnswerEvent(run_id=run_id, content="draft", ready=False))
    assert store.flush()
    dialect = store.dialect
    assert store.transaction(lambda db: fleet_sql.end_lost(db, dialect, run_id, "its process died"))

    async def follow() -> list[EventBase]:
        return await _follow(store, run_id, after=after)

    async def from_history() -> list[EventBase]:
        first = await off_loop(store.events_page, run_id, after, followers.PAGE_CHARS)
        return [event async for event in streaming._past_run(store, run_id, "lost", after, first)]

    for read in (follow, from_history):
        seen = asyncio.run(asyncio.wait_for(read(), 30))
        assert [(event.type, event.seq) for event in seen] == [("error", after + 1)], read
        assert isinstance(seen[0], ErrorEvent) and seen[0].code == "lost", seen
        assert (seen[0].message, seen[0].answer) == ("its process died", "draft"), seen
    store.close()


def test_a_write_that_breaks_a_constraint_loses_only_itself(store_factory: StoreFactory) -> None:
    """An event of a run that was never begun breaks the events' foreign key; the events around it, written in
    the same transaction, are kept. Mutant: dropping the row-by-row retry of a failed batch."""
    store = store_factory()
    store.begin(run_record("aaaa", 1.0))
    store.record("aaaa", _start("aaaa"))
    store.record("never-begun", _start("never-begun"))
    store.record("aaaa", _final("aaaa", "kept"))
    assert store.flush()
    assert [event["type"] for event in store.events("aaaa")] == ["start", "final"]
    assert store.status("aaaa") == "finished" and store.failure is None
    store.close()


def _footprint(path: Path) -> int:
    """Bytes the database takes on disk once its write-ahead log is copied into it: the file and the log."""
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _small_run(store: SqlRunStore) -> None:
    store.begin(run_record("small", 1.0))
    store.record("small", _start("small"))
    store.record("small", _final("small", "a small answer"))
    assert store.flush()


def _big_run(store: SqlRunStore) -> None:
    """A run with a 1 MB answer and four 16 MB answers, then a final one of 16 MB."""
    big = "big"
    store.begin(run_record(big, 2.0))
    store.record(big, _start(big))
    store.record(big, AnswerEvent(run_id=big, content="é" * 1_000_000, ready=False))  # 2 MB of JSON: within
    for index in range(4):
        store.record(big, AnswerEvent(run_id=big, content=f"{index}" * 16_000_000, ready=False))
    store.record(big, _final(big, "z" * 16_000_000))
    assert store.flush()


def test_one_run_stores_at_most_its_budget(store_factory: StoreFactory) -> None:
    """Four 16 MB answers (the run that grew a database by 140 MB) are stored cut past the run's budget, marked,
    and the final answer past the answer limit; a delete forgets the run. Mutants: `_Usage.stored` storing every
    event whole, or the final answer uncapped."""
    budget = RunBudget()
    store = store_factory()
    _small_run(store)
    _big_run(store)
    events = store.events("big")
    assert events[1]["content"] == "é" * 1_000_000 and "stored_cut" not in events[1]
    for index, event in enumerate(events[2:6]):
        assert event["stored_cut"] == {"content": 16_000_000}
        assert event["content"].startswith(f"{index}" * budget.cut_to_chars + " … [15,999,000 more characters")
        assert len(event["content"]) < budget.cut_to_chars + 100
    final = events[-1]
    assert final["type"] == "final" and final["ready"] is True and final["stored_cut"] == {"answer": 16_000_000}
    assert final["answer"].startswith("z" * budget.answer_chars + " … [")
    summary = store.list(limit=1, before=None)[0]
    assert summary.answer_chars == 16_000_000 and summary.answer_preview == "z" * 200
    assert store.delete("big") and store.get("big") is None and store.events("big") == []
    assert store.get("small") is not None


def test_a_delete_gives_the_space_back_to_the_disk(tmp_path: Path) -> None:
    """The SQLite file grows by at most the run's budget and the answer limit, and deleting the run returns the
    file to its size before. Mutants: `_Usage.stored` storing every event whole (the file grew 70 MB), or the
    final answer uncapped (18 MB); `_reclaim` doing nothing (the file stays 6 MB larger after the delete)."""
    path = tmp_path / "h.sqlite3"
    budget = RunBudget()
    store = SqliteRunStore(path)
    _small_run(store)
    before = _footprint(path)
    _big_run(store)
    grown = _footprint(path) - before
    print(f"database: {before:,} bytes, {grown:,} more after a run with four 16 MB answers")
    assert grown < budget.event_bytes + budget.answer_chars + 1024**2
    assert store.delete("big")
    after = _footprint(path)
    print(f"after deleting it: {after:,} bytes")
    assert after <= before + 256 * 1024
    store.close()


def test_a_prompt_with_a_nul_character_is_recorded(store_factory: StoreFactory) -> None:
    """PostgreSQL's text cannot hold NUL: there the prompt is stored with U+FFFD in its place, and the run with
    every event. Mutant: `_storable` passing texts unchanged (the run's row is refused: the run is not in the
    history at all)."""
    store = store_factory()
    store.begin(run_record("nul", 1.0, prompt="before\0after"))
    store.record("nul", CodeEvent(run_id="nul", iteration=1, code="print('\\0')\0"))
    store.record("nul", _final("nul", "an answer with \0 in it"))
    assert store.flush()
    record, events = store.get("nul")  # type: ignore[misc]
    assert record.prompt in ("before\0after", "before\ufffdafter")
    assert record.status == "finished" and record.answer == "an answer with \0 in it"
    assert events[0]["code"] == "print('\\0')\0"


def test_commands_are_kept_by_the_databases_clock(store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose clock runs an hour ahead tidies the commands table: a command another process has just
    sent stays, and one older than COMMANDS_KEPT_S by the database's clock goes. Old behaviour caught (the review):
    commands were stamped and tidied by each process's own clock, so the fast replica removed them as they came."""
    store = store_factory()
    dialect = store.dialect
    fresh = store.transaction(lambda db: fleet_sql.send(db, dialect, "p1", "cancel", {"run_id": "r1"}))
    stale = store.transaction(lambda db: fleet_sql.send(db, dialect, "p1", "cancel", {"run_id": "r2"}))
    store.transaction(
        lambda db: db.execute(
            "UPDATE commands SET created = created - ? WHERE id = ?", (fleet_sql.COMMANDS_KEPT_S + 60, stale)
        )
    )
    real = time.time
    monkeypatch.setattr(fleet_sql.time, "time", lambda: real() + 3600)
    store.transaction(lambda db: fleet_sql.tidy(db, dialect, 1800))
    monkeypatch.undo()
    assert store.query(lambda db: fleet_sql.outcome(db, fresh))[0] == "waiting"
    assert store.query(lambda db: fleet_sql.outcome(db, stale))[0] == "gone"


def test_session_tombstones_are_kept_by_the_databases_clock(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process dies keeping two sessions: they become tombstones (asked for, they are reported gone because
    their process died). A replica whose clock runs an hour ahead tidies the table: a tombstone just made stays,
    one buried longer ago than a session may stay idle (by the database's clock) goes. Old behaviour caught:
    tombstones were tidied by the tidying process's clock against the dead process's, so the fast replica removed
    them at once (the session was then unknown, not gone)."""
    store = store_factory()
    dialect = store.dialect
    store.transaction(lambda db: fleet_sql.register(db, dialect, "p1", "host", 1))
    for session_id in ("kept", "old"):
        row = fleet_sql.SessionRow(id=session_id, owner="p1", created=time.time(), last_used=time.time())
        store.transaction(lambda db, row=row: fleet_sql.save_session(db, row))
    store.transaction(lambda db: db.execute("UPDATE processes SET heartbeat = heartbeat - 100"))
    assert store.transaction(lambda db: fleet_sql.bury(db, dialect, "p1", 60, 60)) == []
    store.transaction(lambda db: db.execute("UPDATE sessions SET last_used = last_used - 1900 WHERE id = 'old'"))
    real = time.time
    monkeypatch.setattr(fleet_sql.time, "time", lambda: real() + 3600)
    store.transaction(lambda db: fleet_sql.tidy(db, dialect, 1800))
    monkeypatch.undo()
    kept = store.query(lambda db: fleet_sql.find_session(db, dialect, "kept", 60))
    assert kept is not None and kept.gone is not None and "died" in kept.gone
    assert store.query(lambda db: fleet_sql.find_session(db, dialect, "old", 60)) is None
