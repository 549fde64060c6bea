"""Run history: what a store of runs promises (`RunStore`), and `open_store`, which picks one from the settings.

Two stores keep the same promises: `SqliteRunStore` (store_sqlite.py), an embedded SQLite file, the default for
one machine; and `PostgresRunStore` (store_postgres.py), a PostgreSQL database that every process and replica
of the service shares (`RLM_DATABASE_URL`). What they share is in store_sql.py: the SQL, the writer thread
(storewriter.py), the schema's versions (migrations.py) and what one run may store (`RunBudget`).

Each event is stored under its sequence number in the run (1, 2, 3…): the event's own `seq` when it has one,
otherwise the order it was recorded in.

What one run may store is bounded (`RunBudget`): its events are stored whole while their JSON fits in the
run's budget; past it, every long text in an event is stored cut, with a marker in the text and the original
lengths under the event's `stored_cut` key. The terminal event is always stored, its `answer` cut only past
the answer limit. The live stream of the process that runs the run is never cut: only what the history keeps,
which is what the other processes follow. A delete gives the space back.

The input itself is stored only when the run asked for it (`keep_input`): it can be huge or private.

The event loop calls the store through `off_loop`, in threads of the store's own.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

if TYPE_CHECKING:
    from .config import Settings
    from .events import EventBase

T = TypeVar("T")
P = ParamSpec("P")
STORE_THREADS = 8
_threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="rlm-store")


async def off_loop(call: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`call` (a read, transaction or wait of the run history) in one of the store's own threads. Not in the
    event loop's default threads: a database that stops answering (a frozen server, a network that drops
    packets) holds a thread until it answers, and runs need the default threads for their workspaces; with
    the history's calls there, 24 reads hung by a frozen PostgreSQL held a new run for 19 s."""
    return await asyncio.get_running_loop().run_in_executor(_threads, functools.partial(call, *args, **kwargs))


RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a run id may be: the engine makes 16 hex characters; anything else names no run."""


def valid_run_id(run_id: str) -> bool:
    """Whether `run_id` could name a run (and is safe in a file name)."""
    return RUN_ID.fullmatch(run_id) is not None


def shown_id(value: str) -> str:
    """An id from a request, quoted for an error message: cut, so that a huge one is not sent back whole."""
    return repr(value[:64]) + ("…" if len(value) > 64 else "")


class StoreUnavailable(Exception):
    """The history database cannot be written or read now (a full disk, an I/O error, a database server that
    cannot be reached); the message says why."""


class RunStillLive(Exception):
    """A run that is still running (in any process of the history) cannot be deleted: it would go on, and
    write its events into the history it was deleted from."""


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


@dataclass
class KeptInput:
    """A run's kept input: its size in bytes, and its bytes a chunk at a time (read as they are sent)."""

    size: int
    chunks: Iterator[bytes]


class RunStore(Protocol):
    def begin(self, record: RunRecord) -> None:
        """A run started."""

    def keep_input(self, run_id: str, source: Path) -> None:
        """The run asked to keep its input: copy it in (runs in a thread; inputs can be large). A copy that
        fails (a full disk, a database gone) is logged and leaves the run without a kept input; the run goes on."""

    def record(self, run_id: str, event: EventBase) -> None:
        """One event of a run, in order (not changed after it is recorded). Terminal events also close
        the run's record."""

    def abandon(self, run_id: str, status: str) -> None:
        """The run ended without a terminal event (cancelled by its client)."""

    def list(self, *, limit: int, before: float | None, before_id: str | None = None) -> list[RunSummary]:
        """Runs, newest first (runs created at the same time by id, descending), created before `before` when
        given; with `before_id` too, those created at `before` whose id sorts below it as well: the runs after
        the one listed last, for paging through runs created at the same time.

        Every read (`list`, `get`, `events`, `status`, `read_input`) raises `StoreUnavailable` when the database
        cannot be read now (a PostgreSQL server that restarts or cannot be reached)."""

    def get(self, run_id: str) -> tuple[RunRecord, builtins.list[dict[str, Any]]] | None:
        """A run and all its events (each with its `seq`), or None."""

    def events(self, run_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        """The run's stored events numbered above `after`, in order, each with its `seq`."""

    def events_page(self, run_id: str, after: int, max_chars: int) -> tuple[builtins.list[dict[str, Any]], bool]:
        """A page of `events` for a stream, so that it holds a page of a run at a time, not the run: the first of
        them, up to the one whose stored text brings theirs past `max_chars`; and whether the page is full (more
        may follow)."""

    def last_event(self, run_id: str) -> dict[str, Any] | None:
        """The run's stored event of the highest number (with its `seq`), or None."""

    def status(self, run_id: str) -> str | None:
        """The run's status (`running`, `finished`, `failed`, `cancelled`, `unfinished`, `lost`), or None if
        unknown."""

    def delete(self, run_id: str) -> bool:
        """Forget a run; False when there was none. Raises `RunStillLive` for a run still running, and
        `StoreUnavailable` when the database cannot be written now."""

    def read_input(self, run_id: str) -> KeptInput | None:
        """The run's kept input, if it was kept."""

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


def open_store(settings: Settings) -> RunStore | None:
    """The store the settings ask for: PostgreSQL at `RLM_DATABASE_URL` when it is set, else SQLite at
    `RLM_HISTORY_DB`, else none (history off). Raises when the database cannot be opened or migrated."""
    if settings.rlm_database_url is not None:
        from .store_postgres import PostgresRunStore

        return PostgresRunStore(settings.rlm_database_url.get_secret_value())
    if settings.history_path is not None:
        from .store_sqlite import SqliteRunStore

        return SqliteRunStore(settings.history_path, shared=settings.web_concurrency > 1)
    return None
