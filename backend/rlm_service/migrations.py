"""The run history's schema: an ordered list of versioned steps, one list for every kind of database.

Version N of the schema is what steps 1..N make. A database records the version it is at (SQLite:
`PRAGMA user_version`; PostgreSQL: the one row of a `schema_version` table) and opening it applies the
steps after that one. Each step runs in one transaction together with its new version number, so an upgrade
that is interrupted resumes at the step it stopped in. A database at a version newer than this code knows is
refused: this code could misread or damage what a newer one wrote.

Indexes that no version of the code depends on are changed outside the steps (`INDEXES`), so that servers
of the release before, which refuse a newer version, can still open the database.

A database made before versions existed has version 0 and today's tables; step 1 creates the tables only if
they are missing, so it serves both that database and an empty one.

The SQL of a step runs unchanged on SQLite (3.35 or newer, for `DROP COLUMN`) and PostgreSQL: the types are
`TEXT`, `BIGINT`, `DOUBLE PRECISION` and `INTEGER` (0/1 for booleans: SQLite has no boolean type), and the
statements are ones both accept (`CREATE ... IF NOT EXISTS`, `ADD COLUMN`, `DROP COLUMN`, `SUBSTR`, `LENGTH`).
Where the two differ, a step carries each dialect's own statements:
- Giving space back after deletes: SQLite needs `auto_vacuum = INCREMENTAL`, which takes effect only through a
  `VACUUM`, and `VACUUM` cannot run inside a transaction. PostgreSQL's autovacuum reclaims space by itself.
- Kept inputs: SQLite keeps them as files beside the database; PostgreSQL, shared by replicas on several
  machines, keeps them in the database, in chunks.

On PostgreSQL every step runs in one transaction (its DDL is transactional), holding an advisory lock, so
that replicas starting together upgrade the database once, one after the other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import psycopg

Dialect = Literal["sqlite", "postgresql"]
PREVIEW_CHARS = 200
"""Characters of a prompt or an answer that the history list shows."""


@dataclass(frozen=True)
class Migration:
    """One step of the schema. `sql` runs on every dialect unless the step gives that dialect its own list."""

    version: int
    summary: str
    sql: tuple[str, ...] = ()
    sqlite: tuple[str, ...] | None = None
    postgresql: tuple[str, ...] | None = None
    transactional: bool = True
    """False for a step SQLite cannot run inside a transaction (`VACUUM`); such a step must be safe to repeat."""

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        own = self.sqlite if dialect == "sqlite" else self.postgresql
        return self.sql if own is None else own


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs and their events",
        (
            """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY,
            created DOUBLE PRECISION NOT NULL,
            finished DOUBLE PRECISION,
            status TEXT NOT NULL,
            prompt TEXT NOT NULL,
            settings TEXT NOT NULL,
            input_chars BIGINT NOT NULL,
            input_lines BIGINT NOT NULL,
            input_bytes BIGINT NOT NULL,
            input_sha256 TEXT,
            input_name TEXT,
            input_kept INTEGER NOT NULL DEFAULT 0,
            answer TEXT,
            ready INTEGER,
            iterations INTEGER,
            usage TEXT,
            error TEXT
        )""",
            "CREATE INDEX IF NOT EXISTS runs_created ON runs (created DESC)",
            """CREATE TABLE IF NOT EXISTS events (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        )""",
        ),
    ),
    # Version 1 numbered a run's events from 0; clients re-attach with the last number they saw, which the
    # event stream numbers from 1. Two steps, so that no intermediate value collides with another row's.
    Migration(
        2,
        "events numbered from 1",
        (
            "UPDATE events SET seq = -seq - 1",
            "UPDATE events SET seq = -seq",
        ),
    ),
    # The history list reads every row of `runs` it shows: long texts live elsewhere, so that a run with a
    # 60 MB prompt costs the list 200 characters. A run's answer is its terminal event's, already in `events`.
    Migration(
        3,
        "prompts in their own table; previews for the list",
        (
            """CREATE TABLE prompts (
            run_id TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
            prompt TEXT NOT NULL
        )""",
            "INSERT INTO prompts (run_id, prompt) SELECT id, prompt FROM runs",
            "ALTER TABLE runs ADD COLUMN prompt_preview TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE runs ADD COLUMN prompt_chars BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD COLUMN answer_preview TEXT",
            "ALTER TABLE runs ADD COLUMN answer_chars BIGINT",
            f"UPDATE runs SET prompt_preview = SUBSTR(prompt, 1, {PREVIEW_CHARS}), prompt_chars = LENGTH(prompt), "
            f"answer_preview = SUBSTR(answer, 1, {PREVIEW_CHARS}), answer_chars = LENGTH(answer)",
            "ALTER TABLE runs DROP COLUMN prompt",
            "ALTER TABLE runs DROP COLUMN answer",
        ),
    ),
    Migration(
        4,
        "space freed by deletes is given back",
        sqlite=(
            "PRAGMA auto_vacuum = INCREMENTAL",
            "VACUUM",
        ),
        postgresql=(),
        transactional=False,
    ),
    # A session's runs are one conversation: the history groups them by the session they belong to.
    Migration(
        5,
        "runs know their session",
        (
            "ALTER TABLE runs ADD COLUMN session_id TEXT",
            "CREATE INDEX IF NOT EXISTS runs_session ON runs (session_id)",
        ),
    ),
    Migration(
        6,
        "kept inputs in the database",
        sqlite=(),
        postgresql=(
            """CREATE TABLE input_chunks (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            n INTEGER NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (run_id, n)
        )""",
        ),
    ),
    # Several processes or replicas on one database find each other here (fleet.py): who is alive
    # (`processes`, each with its heartbeat), which process runs which run (`runs.owner`), which keeps which
    # session (`sessions`), and what one asks another to do (`commands`: cancel a run, end a session, start
    # a follow-up). A session whose process died stays as a tombstone (`gone`) for as long as a session may stay
    # idle, from its burial.
    Migration(
        7,
        "processes, run owners, sessions and commands",
        (
            """CREATE TABLE processes (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            heartbeat DOUBLE PRECISION NOT NULL
        )""",
            "ALTER TABLE runs ADD COLUMN owner TEXT",
            "CREATE INDEX runs_live ON runs (owner) WHERE status = 'running'",
            """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT,
            created DOUBLE PRECISION NOT NULL,
            last_used DOUBLE PRECISION NOT NULL,
            runs TEXT NOT NULL,
            live_run TEXT,
            input_chars BIGINT NOT NULL,
            input_lines BIGINT NOT NULL,
            gone TEXT
        )""",
            "CREATE INDEX sessions_owner ON sessions (owner)",
            """CREATE TABLE commands (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            taken DOUBLE PRECISION,
            result TEXT
        )""",
            "CREATE INDEX commands_target ON commands (target)",
        ),
    ),
    # A run that a server from before version 7 left `running` when it died has no owner, so no process ever
    # ends it (fleet_sql.orphans ends the runs whose owner is gone): its followers would wait for ever, and it
    # could be neither cancelled nor deleted. SQLite's store marks such runs `unfinished` whenever it opens; on
    # PostgreSQL this step does it once. Every process that records runs into a shared database has an owner
    # now (the stdio MCP server too).
    Migration(
        8,
        "runs left running by servers from before run owners",
        sqlite=(),
        postgresql=("UPDATE runs SET status = 'unfinished' WHERE status = 'running' AND owner IS NULL",),
    ),
)

LATEST = MIGRATIONS[-1].version

INDEXES: tuple[str, ...] = (
    # The history list pages by (created, id), so that runs created at the same time are not skipped at a
    # page's end: this index follows that order, and serves what `runs_created` (step 1) served.
    "CREATE INDEX IF NOT EXISTS runs_created_id ON runs (created DESC, id DESC)",
    "DROP INDEX IF EXISTS runs_created",
)
"""Run at an open that finds them not run yet (`_indexes_current`), after the steps, on every dialect:
changes of indexes only, which no version of the code reads or writes differently, so they raise no schema
version. A step would: servers of the version before would then refuse the database, and a rolling deploy
(their replicas restarting on the shared database) or a rollback would stop."""


def _indexes_current(found: set[str]) -> bool:
    """Whether `INDEXES` have run on a database whose table `runs` has the indexes named `found`."""
    return "runs_created_id" in found and "runs_created" not in found


class SchemaTooNew(RuntimeError):
    """The database was made by a newer version of the service."""


def migrate_sqlite(db: sqlite3.Connection) -> int:
    """Bring a SQLite database (a connection in autocommit mode) to the latest version. Returns the version it
    was at. Safe with several processes opening the same file: each step rechecks the version under the write
    lock before it runs."""
    found = _sqlite_version(db)
    if found > LATEST:
        raise SchemaTooNew(
            f"the history database is at schema version {found}; this version of the service "
            f"knows versions up to {LATEST}: upgrade the service, or point RLM_HISTORY_DB elsewhere"
        )
    for step in MIGRATIONS:
        if not step.transactional and _sqlite_version(db) < step.version:
            for statement in step.statements("sqlite"):  # outside the lock: another process may run them too
                db.execute(statement)
        with _write_locked(db):
            # Under the write lock, the version tells what every process has done: a step runs (or, outside a
            # transaction, is recorded) only where nobody has gone past it. A step recorded without that check
            # could set the version back behind another process's later steps, and this process would then
            # run those again (`duplicate column`).
            if _sqlite_version(db) < step.version:
                if step.transactional:
                    for statement in step.statements("sqlite"):
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {step.version:d}")
    with _write_locked(db):
        if not _indexes_current({str(row[1]) for row in db.execute("PRAGMA index_list(runs)")}):
            for statement in INDEXES:
                db.execute(statement)
    return found


@contextmanager
def _write_locked(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction holding SQLite's write lock from its start (`BEGIN IMMEDIATE`), committed at the end of
    the block, rolled back if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def migrate_postgresql(db: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Bring a PostgreSQL database (a connection whose rows are tuples) to the latest version. Returns the version
    it was at."""
    found: int | None = None
    for step in MIGRATIONS:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            db.execute("INSERT INTO schema_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if found is None:
                found = version
                if found > LATEST:
                    raise SchemaTooNew(
                        f"the history database is at schema version {found}; this version of the "
                        f"service knows versions up to {LATEST}: upgrade the service, or point "
                        "RLM_DATABASE_URL elsewhere"
                    )
            if version < step.version:
                for statement in step.statements("postgresql"):
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = %s", (step.version,))
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        rows = db.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'runs'"
        ).fetchall()
        if not _indexes_current({str(row[0]) for row in rows}):  # CREATE INDEX IF NOT EXISTS would lock writes
            for statement in INDEXES:
                db.execute(statement)
    return found or 0


ADVISORY_LOCK = 0x524C4D5F534348  # "RLM_SCH": the key replicas take while they upgrade the schema


def _sqlite_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version
