"""The shared run history: one PostgreSQL database for every process and replica of the service
(`RLM_DATABASE_URL`). It keeps the promises of `RunStore` as the SQLite store does, with the same SQL
(store_sql.py) and the same schema versions (migrations.py, recorded in the `schema_version` table).

Synchronous psycopg in threads, not async psycopg on the event loop: the event loop never waits on the
database either way (writes are queued to the writer thread, a put on a queue; reads run in worker threads,
`asyncio.to_thread` in the routes, as for SQLite), and this way both stores share one writer thread
(storewriter.py): its order, batches, bounded backlog and its retries with backoff while the database is gone,
which is what keeps runs going through a restart of PostgreSQL. `RunStore` stays one synchronous protocol.

Connections: the writer thread holds one of its own and opens a new one after each failure; reads take one
from a pool (psycopg_pool) that checks each connection before handing it out, so that the connections from
before a restart are replaced. While the database cannot be reached, reads raise `StoreUnavailable` (the
routes answer 503) and writes wait in the writer thread.

Kept inputs live in the database (`input_chunks`, 1 MiB of bytes a row), so that any replica can serve them.
PostgreSQL's text cannot hold the NUL character: a NUL in a stored text (a prompt) is stored as U+FFFD.
Events are stored as JSON, where NUL is escaped, and come back whole.

A run whose process died is not marked when a store opens: with several replicas on one database, one that
starts cannot tell another's live runs from those of a process that died. The processes tell each other
(fleet.py): each heartbeats, and the runs of one that stopped are ended as `lost`. Every write of events also
sends `NOTIFY rlm_events, '<run id>'` in its transaction, so that processes following those runs read them at
once (followers.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from .fleet_sql import EVENTS_CHANNEL, notify
from .migrations import migrate_postgresql
from .store import KeptInput, RunBudget, StoreUnavailable, valid_run_id
from .store_sql import SqlRunStore
from .storewriter import Db

log = logging.getLogger("rlm_service")

CONNECT: dict[str, Any] = {
    "connect_timeout": 5,
    "application_name": "rlm-service",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
"""Connection parameters: a server that does not answer is given up on in seconds, not minutes."""
READ_TIMEOUT_S = 5.0
READERS = 4
"""Connections of the read pool."""
RECONNECT_S = 5.0
"""How long the read pool tries to replace a lost connection before it leaves the next read to try again: its
tries are spaced ever wider (1, 2, 4… s), so that a long window would keep reads failing long after the database
is back."""
START_WAIT_S = 30.0
"""How long the store waits at start for a database that cannot be reached yet (one starting beside it)."""
CHUNK_BYTES = 1024**2
KEEP_WAIT_S = 30.0


def transient(exc: BaseException) -> bool:
    """Whether a failure may pass by itself: the connection broke or could not be made, the server is shutting
    down or full, a transaction conflicted, or the server is a read-only standby during a failover."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction))


class PgDb:
    """A `Db` on one psycopg connection: `?` in the shared SQL becomes psycopg's `%s`."""

    def __init__(self, connection: psycopg.Connection[DictRow]) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.connection.execute(_dialect(sql), _storable(params)).rowcount

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Mapping[str, Any]]:
        return list(self.connection.execute(_dialect(sql), _storable(params)).fetchall())

    def begin(self) -> None:
        """psycopg opens the transaction with the first statement."""

    def commit(self) -> None:
        self.connection.commit()

    def rollback(self) -> None:
        try:
            self.connection.rollback()
        except psycopg.Error:
            pass

    def transient(self, exc: BaseException) -> bool:
        return transient(exc)

    def broken(self) -> bool:
        return self.connection.broken or self.connection.closed

    def close(self) -> None:
        self.connection.close()


class PostgresRunStore(SqlRunStore):
    """The store shared by replicas: a PostgreSQL database at `url` (`postgresql://user:password@host/db`)."""

    dialect = "postgresql"
    share_lock = " FOR SHARE"

    def __init__(self, url: str, budget: RunBudget | None = None, *, start_wait_s: float = START_WAIT_S) -> None:
        self._url = url
        with _connect_at_start(url, start_wait_s) as db:
            migrate_postgresql(db)
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            url,
            min_size=1,
            max_size=READERS,
            kwargs={**CONNECT, "row_factory": dict_row},
            check=ConnectionPool.check_connection,
            configure=_give_up_on_locks,
            timeout=READ_TIMEOUT_S,
            reconnect_timeout=RECONNECT_S,
            name="rlm-history",
            open=False,
        )
        self._pool.open(wait=False)
        super().__init__(lambda: PgDb(self._connect_pg()), budget, announce=_announce)

    def _connect_pg(self) -> psycopg.Connection[DictRow]:
        return psycopg.connect(self._url, row_factory=dict_row, **CONNECT)

    async def listening_connection(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        """A new connection of the event loop, in autocommit mode, for `LISTEN` (followers.py)."""
        return await psycopg.AsyncConnection.connect(self._url, autocommit=True, **CONNECT)

    def keep_input(self, run_id: str, source: Path) -> None:
        """The input goes in one transaction of its own connection, with the mark that it was kept: all of it or
        none. The run's row must be written first (the chunks refer to it): the writer is flushed."""
        if not valid_run_id(run_id):
            return
        if not self.flush(KEEP_WAIT_S):
            log.warning(
                "run history: the input of run %s was not kept: the history is not being written (%s)",
                run_id,
                self.failure or "it did not answer in time",
            )
            return
        try:
            with self._connect_pg() as connection, open(source, "rb") as file:
                with connection.cursor().copy("COPY input_chunks (run_id, n, data) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "int4", "bytea"])
                    n = 0
                    while (chunk := file.read(CHUNK_BYTES)) or n == 0:
                        copy.write_row((run_id, n, chunk))
                        n += 1
                connection.execute("UPDATE runs SET input_kept = 1 WHERE id = %s", (run_id,))
        except (OSError, psycopg.Error) as exc:
            log.warning("run history: the input of run %s was not kept: %s", run_id, exc)

    def read_input(self, run_id: str) -> KeptInput | None:
        if not valid_run_id(run_id):
            return None
        with self._reading() as db:
            found = db.rows(
                "SELECT COUNT(*) AS chunks, SUM(LENGTH(data)) AS size FROM input_chunks WHERE run_id = ?", (run_id,)
            )[0]
        if not found["chunks"]:
            return None
        return KeptInput(size=int(found["size"]), chunks=self._chunks(run_id, int(found["chunks"])))

    def _chunks(self, run_id: str, count: int) -> Iterator[bytes]:
        """The chunks one query each, so that a slow download holds no connection between them."""
        for n in range(count):
            with self._reading() as db:
                rows = db.rows("SELECT data FROM input_chunks WHERE run_id = ? AND n = ?", (run_id, n))
            if not rows:  # the run was deleted meanwhile
                return
            yield bytes(rows[0]["data"])

    def _reclaim(self, db: Db, deleted: object) -> None:
        """Nothing: PostgreSQL's autovacuum gives the space back."""

    def _after_delete(self, run_id: str) -> None:
        """Nothing: the run's kept input went with its rows (`ON DELETE CASCADE`)."""

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Db]:
        with self._pool.connection() as connection:
            if snapshot:
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield PgDb(connection)

    def _transient(self, exc: BaseException) -> bool:
        return transient(exc)

    def close(self) -> None:
        super().close()
        self._pool.close()


def _give_up_on_locks(connection: psycopg.Connection[DictRow]) -> None:
    """A read pool's connection waits READ_TIMEOUT_S at most for a lock (another client's `LOCK TABLE`, a
    migration, `VACUUM FULL`), then fails as `StoreUnavailable` (503), as a read on SQLite does after its busy
    timeout: without it, a request waited as long as the lock was held."""
    connection.execute(f"SET lock_timeout = {int(READ_TIMEOUT_S * 1000)}")
    connection.commit()


def _connect_at_start(url: str, wait_s: float) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection, trying again for `wait_s` while the server cannot be reached; then `StoreUnavailable`."""
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            return psycopg.connect(url, **CONNECT)
        except psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split())
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"RLM_DATABASE_URL: the database cannot be reached: {reason}") from None
            if not waiting:
                log.warning("run history: waiting up to %.0f s for PostgreSQL: %s", wait_s, reason)
                waiting = True
            time.sleep(1.0)


def reach_problem(url: str, wait_s: float = START_WAIT_S) -> str | None:
    """Why the history cannot be kept at `url`: the database cannot be reached within `wait_s` (a wrong host, port,
    name or password); None once it can. Checked at start, before the server's app starts, so that a bad URL ends
    the start with one line rather than a traceback of the app's lifespan."""
    try:
        with _connect_at_start(url, wait_s):
            return None
    except StoreUnavailable as exc:
        return str(exc)


def _announce(db: Db, run_ids: list[str]) -> None:
    """In the writer's transaction: which runs have new events (delivered when it commits)."""
    notify(db, "postgresql", EVENTS_CHANNEL, run_ids)


@lru_cache(maxsize=64)
def _dialect(sql: str) -> str:
    return sql.replace("?", "%s")


def _storable(params: Sequence[object]) -> Sequence[object]:
    return [value.replace("\0", "\ufffd") if isinstance(value, str) and "\0" in value else value for value in params]
