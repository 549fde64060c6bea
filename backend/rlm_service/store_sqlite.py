"""The default run history: one SQLite file on this machine.

Writes go through one thread of their own (store_sql.py), so recording an event never blocks the event loop;
reads open their own connection. A run that was still `running` when the server stopped (a crash, a kill) is
marked `unfinished` when the store opens again: it is kept, not lost. A kept input is a file beside the
database, `inputs/<run id>.txt`.

Several server processes of one instance (`WEB_CONCURRENCY`) share the file (`shared`): a process that opens it
then leaves the runs of the others alone (fleet.py ends those of a process that died, as `lost`), and marks
`unfinished` only what a server alone on the file left running.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any

from .migrations import migrate_sqlite
from .store import KeptInput, RunBudget, StoreUnavailable, valid_run_id
from .store_sql import SqlRunStore
from .storewriter import Db, Job

log = logging.getLogger("rlm_service")

READ_TIMEOUT_S = 5.0
CHUNK_BYTES = 1024**2
TRANSIENT = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOMEM,
    }
)
"""Primary result codes of failures that may pass: a write is kept and tried again."""


def transient(exc: BaseException) -> bool:
    """Whether an SQLite error may pass by itself (see TRANSIENT)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in TRANSIENT


class SqliteDb:
    """A `Db` on one SQLite connection in autocommit mode (transactions are opened explicitly)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.connection.execute(sql, params).rowcount

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Mapping[str, Any]]:
        cursor = self.connection.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def begin(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.connection.execute("COMMIT")

    def rollback(self) -> None:
        if self.connection.in_transaction:  # SQLite ends the transaction itself after some failures (a full disk)
            try:
                self.connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def transient(self, exc: BaseException) -> bool:
        return transient(exc)

    def broken(self) -> bool:
        return False  # a file: there is no server to close it

    def close(self) -> None:
        try:
            self.connection.close()
        except sqlite3.Error:
            pass


def location_problem(path: Path) -> str | None:
    """Why the history cannot be kept in an SQLite file at `path`, in words; None when it can. Checked at start,
    where a path that cannot be one (a directory, a file that is not SQLite, a folder that cannot be made)
    otherwise ended the app's startup with a traceback. Makes the folders and the file, as the store would."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "inputs").mkdir(exist_ok=True)
        with closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA schema_version").fetchone()  # a file that is not SQLite fails here
    except (OSError, sqlite3.Error) as exc:
        return f"{path} cannot hold the run history ({exc})"
    return None


class SqliteRunStore(SqlRunStore):
    """The default store: one SQLite file, one writer thread."""

    dialect = "sqlite"

    def __init__(self, path: Path, budget: RunBudget | None = None, *, shared: bool = False) -> None:
        """`shared`: other server processes use the file at the same time."""
        self.path = path
        self.inputs = path.parent / "inputs"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(exist_ok=True)
        with closing(_connect_writer(path)) as db:
            migrate_sqlite(db)
            if shared:
                db.execute("UPDATE runs SET status = 'unfinished' WHERE status = 'running' AND owner IS NULL")
            else:  # alone on the file: whatever another server left behind is over
                db.execute("UPDATE runs SET status = 'unfinished' WHERE status = 'running'")
                for table in ("processes", "sessions", "commands"):
                    db.execute(f"DELETE FROM {table}")
        super().__init__(lambda: SqliteDb(_connect_writer(path)), budget)

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

    def read_input(self, run_id: str) -> KeptInput | None:
        if not valid_run_id(run_id):
            return None
        try:
            file = open(self.inputs / f"{run_id}.txt", "rb")  # closed by `_chunks`
        except FileNotFoundError:
            return None
        return KeptInput(size=Path(file.name).stat().st_size, chunks=_chunks(file))

    def _after_delete(self, run_id: str) -> None:
        (self.inputs / f"{run_id}.txt").unlink(missing_ok=True)

    def _reclaim(self, db: Db, deleted: object) -> None:
        """After a delete: hand the freed pages back to the file system."""
        if deleted and isinstance(db, SqliteDb):
            db.connection.executescript("PRAGMA incremental_vacuum")  # `execute` would step it once: one page
            db.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Db]:
        # Opened, never created (`mode=rw`): for a file deleted while the server runs, a new one would be an empty
        # database, whose missing tables fail every read.
        try:
            opened = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=rw", uri=True, timeout=READ_TIMEOUT_S, isolation_level=None
            )
        except sqlite3.OperationalError:
            if self.path.exists():
                raise
            raise StoreUnavailable(
                f"the run history cannot be read: its file {self.path} is gone (deleted while the server runs); "
                "restart the server to start a new one"
            ) from None
        with closing(opened) as connection:
            if snapshot:
                connection.execute("BEGIN")
            yield SqliteDb(connection)

    def _transient(self, exc: BaseException) -> bool:
        return transient(exc)


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the file in WAL mode (it stays so). The switch needs the file to itself, and SQLite refuses it at
    once, without waiting, while another connection writes: two server processes opening a new file together
    (one migrating it) meet that. Tried again until `READ_TIMEOUT_S` has passed."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _chunks(file: IO[bytes]) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def _connect_writer(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=READ_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    _use_wal(db)
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_size_limit = 4194304")  # a checkpointed WAL shrinks back to 4 MiB
    return db
