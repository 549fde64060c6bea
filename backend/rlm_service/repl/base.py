"""What the controller sees of a REPL, whichever kind runs the code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

AsyncBatch = Callable[[list[str]], Awaitable[list[str]]]
"""Serves `llm_batch` on the server's event loop: prompts in, replies (or `Error: …`) out, in order."""

AsyncRlm = Callable[[list[str], list[str | None]], Awaitable[list[str]]]
"""Serves `rlm_batch`: prompts and their contexts in, the child runs' final answers out, in order."""


RESTARTED_NOTE = ("The REPL was restarted: every variable you defined is lost; `context`, the llm functions "
                  "and answer['content'] are back.")
"""What the root model reads after a cell cost it its namespace (timeout, crash)."""


class ReplError(Exception):
    """The REPL itself failed (not the generated code): the run cannot go on."""


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
class CellOutcome:
    """One executed cell as the controller reports it."""

    stdout: str
    error: str | None
    truncated: bool
    duration_ms: int
    answer_content: str
    answer_ready: bool
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    """PNG images, base64."""
    restarted: bool = False
    """The REPL was restarted during this cell: every variable but the provided ones is gone."""


class Repl(Protocol):
    async def start(self) -> None:
        """Load the input and get ready to run cells."""

    async def execute(self, code: str, timeout: float) -> CellOutcome:
        """Run one cell; errors in the code come back in the outcome, never as exceptions."""

    async def close(self) -> None:
        """Stop everything this REPL started. Safe to call twice and from a cancelled task."""
