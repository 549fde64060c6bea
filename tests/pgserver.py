"""A real, throwaway PostgreSQL server for the tests: `initdb` in a temporary directory, `pg_ctl` on a free
port of 127.0.0.1, removed afterwards. PostgreSQL refuses to run as root, so as root (CI) the server runs as
`nobody`. Without PostgreSQL's binaries (a workstation) the tests that need it skip; under CI (`CI` set) they
fail, as the browser tests do: CI must install Debian's `postgresql` package.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path

import psycopg
import pytest

from rlm_service.store import RunBudget
from rlm_service.store_postgres import PostgresRunStore
from rlm_service.store_sql import SqlRunStore
from rlm_service.store_sqlite import SqliteRunStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pg_bin() -> Path | None:
    """The directory of `initdb` and `pg_ctl`: Debian keeps them off the PATH, under /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else []
    candidates += sorted(
        (Path(path) for path in glob("/usr/lib/postgresql/*/bin")),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    return next((path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)


def need_postgres() -> Path:
    """PostgreSQL's binaries; skips the test without them, or fails it under CI."""
    found = pg_bin()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's postgresql package for the PostgreSQL tests (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    return found


class PgServer:
    """One PostgreSQL server in a directory of its own; `url(name)` reaches its database `name`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="test-postgresql-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self._user: pwd.struct_passwd | None = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")

    def _pg(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self._user is not None:
            command = [
                "setpriv",
                f"--reuid={self._user.pw_uid}",
                f"--regid={self._user.pw_gid}",
                "--clear-groups",
                "--",
                *command,
            ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if done.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(
                f"{program} failed: {done.stdout}{done.stderr}" + (log.read_text() if log.exists() else "")
            )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
            "-c fsync=off -c max_connections=200"
        )
        self._pg(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))

    def processes(self) -> list[int]:
        """The server's processes: its postmaster and the postmaster's children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        found = [postmaster]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as stat:
                        parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
                except OSError:
                    continue
                if parent == postmaster:
                    found.append(int(entry))
        return found

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # it was not running
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One server for the session's tests; each test takes a database of its own (`pg_url`)."""
    server = PgServer(need_postgres())
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a new, empty database on the session's server."""
    return pg_server.create_database()


@pytest.fixture
def own_pg_server() -> Iterator[PgServer]:
    """A server for one test alone (one that stops and restarts it)."""
    server = PgServer(need_postgres())
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., SqlRunStore]]:
    """Opens the store under test, on the same database at each call: SQLite in the test's directory, or
    PostgreSQL in a database of its own on the session's server. Every store opened is closed afterwards."""
    opened: list[SqlRunStore] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None

    def open_store(budget: RunBudget | None = None) -> SqlRunStore:
        store: SqlRunStore = (
            PostgresRunStore(url, budget) if url is not None else SqliteRunStore(tmp_path / "h.sqlite3", budget)
        )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
