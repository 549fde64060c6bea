"""What the engine and the controller see of a REPL, whichever kind runs the code, and the registry of kinds.

A REPL kind is one module that registers a factory under its name (`RLM_REPL`): `subprocess` (a confined
worker process, the default) and `inprocess` (a thread of the server, for trusted use). The kinds are found,
not listed: every module of this package whose name ends in `_repl`, and every module another installed package
names under the entry-point group `rlm_service.repl`, is imported once and registers what it offers.

A REPL is made for a workspace and lives as long as its owner wants: one run, or every run of a session. What a
cell's `llm_batch` and `rlm_batch` reach is given with each cell (`SubCalls`), so the REPL does not belong to
any one run's controller.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from .executor import CellOutcome

if TYPE_CHECKING:
    from .workspace import Workspace

__all__ = ["CellOutcome", "Repl", "ReplBackend", "ReplError", "ReplOptions", "RunStart", "SubCalls"]

RESTARTED_NOTE = (
    "The REPL was restarted: every variable you defined is lost; `context`, the llm functions "
    "and answer['content'] are back."
)
"""What the root model reads after a cell cost it its namespace (timeout, crash)."""


class ReplError(Exception):
    """The REPL itself failed (not the generated code): the run cannot go on."""


class SubCalls(Protocol):
    """What a cell's `llm_batch`/`rlm_batch` reach: the run executing the cell, on the server's event loop."""

    async def batch(self, prompts: list[str]) -> list[str]:
        """`llm_batch`: the sub-model's replies (or `Error: …` slots), in order."""

    async def rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        """`rlm_batch`: the child runs' final answers (or `Error: …` slots), in order."""


@dataclass
class ReplOptions:
    max_output_chars: int = 8192
    memory_mb: int = 4096
    """Address space of each process of the run's code."""
    processes: int = 8
    """Processes and threads the run's code may start besides the worker's own."""
    disk_mb: int = 1024
    """What the run's files may take in its working directory."""
    network: bool = False
    cpu_seconds: int = 3600
    landlock: bool = True
    """Confine file access with Landlock where the kernel offers it (off: what kernels without it get)."""
    sandbox: bool = True


@dataclass
class RunStart:
    """What a REPL says when a new run (a session's follow-up) begins on it."""

    variables: list[str]
    """One line per variable of earlier runs: `name: type, size = short repr`."""
    restarted: str | None = None
    """Why the REPL lost its variables since the previous run (its worker died), or None."""


class Repl(Protocol):
    async def start(self) -> None:
        """Load the input and get ready to run cells."""

    async def execute(self, code: str, timeout: float, calls: SubCalls) -> CellOutcome:
        """Run one cell; errors in the code come back in the outcome, never as exceptions."""

    async def begin_run(self, timeout: float) -> RunStart:
        """A new run on a REPL that served earlier ones: `answer` starts empty; the variables are listed."""

    async def close(self) -> None:
        """Stop everything this REPL started. Safe to call twice and from a cancelled task."""


class ReplBackend(Protocol):
    """One kind of REPL: what its REPLs share (a zygote, a container client…) and how one is made."""

    isolates_uid: bool
    """Whether its code runs as a uid of its own per run (the workspace is then made for that uid)."""
    keeps_off_network: bool
    """Whether its code is kept off the network when RLM_WORKER_NETWORK is off (the root model is told which)."""

    async def start(self) -> None:
        """Get ready before the first run (warm what the first run would otherwise wait for)."""

    def make(self, workspace: Workspace, options: ReplOptions) -> Repl:
        """A REPL for `workspace` (not started yet)."""

    async def close(self) -> None:
        """Stop what the kind keeps (its REPLs are closed by their owners)."""


BackendFactory = Callable[[list[str]], ReplBackend]
"""Makes a kind's backend from the modules its workers preload (RLM_WORKER_PRELOAD)."""
REGISTRY: dict[str, BackendFactory] = {}
"""The REPL kinds by name (`RLM_REPL`); a kind's module adds itself with `register`."""


def register(name: str) -> Callable[[BackendFactory], BackendFactory]:
    def add(factory: BackendFactory) -> BackendFactory:
        REGISTRY[name] = factory
        return factory

    return add


def kinds() -> list[str]:
    """The names of every REPL kind there is (importing the modules that define them, once)."""
    global _found
    if not _found:
        package = importlib.import_module(__package__ or "rlm_service.repl")
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_repl"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        for entry in entry_points(group="rlm_service.repl"):
            entry.load()
        _found = True
    return sorted(REGISTRY)


_found = False


def backend(kind: str, preload: list[str]) -> ReplBackend:
    """The backend of the registered REPL `kind`."""
    if kind not in kinds():
        raise ReplError(f"unknown REPL kind {kind!r}; known: {', '.join(kinds())}")
    return REGISTRY[kind](preload)
