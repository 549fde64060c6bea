"""What the command line does with the terminal: prints runs safely whatever the model wrote, and takes Ctrl-C.

Model output, generated code's output and a server's messages are untrusted text. Written raw, an escape
sequence in them would act on the user's terminal: set the window title, clear the screen, write the
clipboard (OSC 52), move the cursor to overwrite what was printed. `printable` shows every control
character except newline and tab as a visible escape (`\\x1b`), which leaves the rest of such a
sequence as plain, inert text. Everything the command prints goes through it (or through `json_line`).

`Output` prints a run's events (progress on stderr, the answer on stdout, or JSON lines) and knows how
the run ended; `Interrupt` turns Ctrl-C into "stop the run" first and "stop the command" second.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, TextIO

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
"""An answer; an `error` event or a broken stream; could not start; stopped by Ctrl-C (128 + SIGINT)."""

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 controls but tab and newline, DEL, and the C1 controls (U+0080–U+009F: 8-bit CSI, OSC, …)."""

_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")
"""What `json.dumps(..., ensure_ascii=False)` leaves raw that a terminal or a line reader acts on."""


def printable(text: str) -> str:
    """`text` with every control character but newline and tab shown as an escape; CRLF becomes a newline."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text.replace("\r\n", "\n"))


def json_line(value: dict[str, Any]) -> str:
    """One line of JSON, non-ASCII text kept readable, with nothing in it that acts on a terminal (JSON
    escapes C0 controls itself; DEL, C1 controls and the Unicode line separators are escaped here)."""
    text = json.dumps(value, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


MAX_INDENT = 16
"""Levels of indentation a child run's lines get at most, whatever depth a server says it has."""


def _first_line(text: object, limit: int) -> str:
    return str(text).strip().split("\n")[0][:limit]


class ProgressPrinter:
    """Human-readable progress on a terminal (or a log, when stderr is not one). Every line goes through
    `printable`: the printer's own text has no control characters, what it quotes may have any."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._bar_shown = False

    def say(self, text: str) -> None:
        """One line of the command's own (after a progress bar that was being drawn)."""
        self._line(text)

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.write(printable(text) + "\n")
        self.stream.flush()

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Print one event of the run; events of unknown types, and unknown fields, are ignored."""
        handler = self.HANDLERS.get(name)
        if handler is None:
            return
        try:
            handler(self, data)
        except (TypeError, ValueError, AttributeError, OverflowError):
            # a field of another type than the service sends (`"chars": "many"`, `"usage": [1]`), from a server
            # that is not the service or a broken one: said in a line, where it ended the command with a traceback
            self._line(f"(a {name} event with a field this command cannot read)")

    def _start(self, data: dict[str, Any]) -> None:
        info = data.get("input") or {}
        session = f" in session {data['session_id']}" if data.get("session_id") else ""
        self._line(
            f"run {data.get('run_id')}{session}: {data.get('model')} (sub: {data.get('sub_model')}), "
            f"input {info.get('chars', 0):,} characters, {info.get('lines', 0):,} lines"
        )

    def _thought(self, data: dict[str, Any]) -> None:
        self._line(f"[{data.get('iteration')}] {_first_line(data.get('text', ''), 100)}")

    def _code(self, data: dict[str, Any]) -> None:
        lines = str(data.get("code", "")).strip().split("\n")
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        self._line(f"[{data.get('iteration')}] >>> {lines[0][:90]}{more}")

    def _subcalls(self, data: dict[str, Any]) -> None:
        self._bar(int(data.get("done", 0)), int(data.get("failed", 0)), int(data.get("total", 0)))

    def _output(self, data: dict[str, Any]) -> None:
        error = data.get("error")
        shown = str(error).strip().split("\n")[-1] if error else str(data.get("stdout", "")).strip()
        shown = shown[:200].replace("\n", "\n    ")
        self._line(f"    {'error: ' if error else ''}{shown} ({data.get('duration_ms', 0)} ms)")

    def _figure(self, data: dict[str, Any]) -> None:
        self._line(f"    [figure, {len(str(data.get('data', ''))) * 3 // 4:,} bytes of PNG]")

    def _quiet(self, data: dict[str, Any]) -> None:
        """`answer` and `usage`: the answer is printed once, at the end; usage is summed in `final`."""

    def _error(self, data: dict[str, Any]) -> None:
        self._line(f"error ({data.get('code')}): {data.get('message')}")
        self._note(data)

    def _child_event(self, data: dict[str, Any]) -> None:
        self._child(int(data.get("depth", 1)), str(data.get("event")), data.get("data") or {})

    def _final(self, data: dict[str, Any]) -> None:
        usage = data.get("usage") or {}
        root, sub = usage.get("root") or {}, usage.get("sub") or {}
        state = "ready" if data.get("ready") else "NOT ready (iteration limit or no code)"
        self._line(
            f"done: {state}, {data.get('iterations')} iterations, {root.get('requests', 0)} root and "
            f"{sub.get('requests', 0)} sub requests, {data.get('elapsed_ms', 0) / 1000:.1f} s"
        )
        self._note(data)

    def _note(self, data: dict[str, Any]) -> None:
        """A terminal event's `note`: what the user should know about how the run ended."""
        if data.get("note"):
            self._line(f"note: {data['note']}")

    def _child(self, depth: int, kind: str, data: dict[str, Any]) -> None:
        """A child run's event, indented by depth: its start, cells and end; the rest stays quiet."""
        prefix = "    " * min(max(depth, 0), MAX_INDENT) + f"↳ child (depth {depth})"
        if kind == "start":
            self._line(f"{prefix} started on {(data.get('input') or {}).get('chars', 0):,} characters")
        elif kind == "code":
            self._line(f"{prefix} [{data.get('iteration')}] >>> {_first_line(data.get('code', ''), 80)}")
        elif kind == "final":
            self._line(f"{prefix} answered: {str(data.get('answer', '')).strip()[:100]!r}")
        elif kind == "error":
            self._line(f"{prefix} failed ({data.get('code')}): {data.get('message')}")

    HANDLERS: ClassVar[dict[str, Callable[[ProgressPrinter, dict[str, Any]], None]]] = {
        "start": _start,
        "thought": _thought,
        "code": _code,
        "subcalls": _subcalls,
        "output": _output,
        "figure": _figure,
        "answer": _quiet,
        "usage": _quiet,
        "final": _final,
        "error": _error,
        "child": _child_event,
    }
    """Every event type the printer knows (a test checks it knows them all)."""

    def _bar(self, done: int, failed: int, total: int) -> None:
        width = 30
        filled = min(max(width * done // max(total, 1), 0), width)  # a server's `done` past `total` fills it
        text = f"    sub-calls [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        text += f" ({failed} failed)" if failed else ""
        if self.live:
            self.stream.write("\r" + text)
            self._bar_shown = done < total
            if not self._bar_shown:
                self.stream.write("\n")
        elif done == total:
            self.stream.write(text + "\n")
        self.stream.flush()


class Output:
    """What the command prints of runs: every event as a JSON line on stdout (`as_json`) or as progress on
    stderr with the answer on stdout; figures saved when asked. Remembers how the last run ended."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool = False, figures_dir: Path | None = None) -> None:
        self.out = out
        self.as_json = as_json
        self.figures_dir = figures_dir
        self.progress = ProgressPrinter(err)
        self.figures = 0
        self.session_id: str | None = None
        """The session of the last run that named one (in its `start` event)."""
        self.ended: tuple[str, dict[str, Any]] | None = None
        """The last run's terminal event."""

    def say(self, text: str) -> None:
        """A line of the command's own, on stderr (never in the JSON lines)."""
        self.progress.say(text)

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "start":
            self.ended = None
            if isinstance(data.get("session_id"), str):
                self.session_id = data["session_id"]
        if self.as_json:
            # `event` is the event's name; a `child` event's field of that name (its inner event's type, which is
            # also its `data.type`) replaced it, so the child's `final` read as the run's own
            fields = {key: value for key, value in data.items() if key != "event"}
            self.out.write(json_line({"event": name, **fields}) + "\n")
            self.out.flush()
        else:
            self.progress.event(name, data)
        if name == "figure" and self.figures_dir is not None:
            self.figures += 1
            self.say(f"    {save_figure(self.figures_dir, data, self.figures)}")
        if name in ("final", "error"):
            self.ended = (name, data)
            if name == "final" and not self.as_json:
                self.out.write(printable(str(data.get("answer", ""))).rstrip("\n") + "\n")
                self.out.flush()

    @property
    def status(self) -> int:
        """The exit status the last run earns: 0 for an answer, 1 otherwise."""
        return EXIT_OK if self.ended is not None and self.ended[0] == "final" else EXIT_ERROR

    @property
    def cancelled(self) -> bool:
        return self.ended is not None and self.ended[0] == "error" and self.ended[1].get("code") == "cancelled"


def save_figure(directory: Path, data: dict[str, Any], number: int) -> str:
    """Write a `figure` event's PNG as `figure-<number>.png` in `directory`; says what was done."""
    try:
        png = base64.b64decode(str(data.get("data", "")), validate=True)
    except binascii.Error:
        return f"figure {number} was not valid base64; not saved"
    if data.get("mime", "image/png") != "image/png" or not png.startswith(b"\x89PNG"):
        return f"figure {number} is not a PNG; not saved"
    path = directory / f"figure-{number}.png"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    except OSError as exc:  # a directory that is a file, or cannot be written: the run goes on, said in a line
        return f"figure {number} was not saved in {directory}: {exc.strerror or exc}"
    return f"saved {path}"


class Interrupt:
    """Ctrl-C (SIGINT) while the command works. The first calls `on_first`, which asks the run to stop (its
    `error` event then ends the stream) and returns True; a second Ctrl-C, or one when `on_first` is unset
    or returns False, stops the command at once and `guard` returns EXIT_INTERRUPTED after `on_stop`."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.count = 0
        self.on_first: Callable[[], bool] | None = None
        self.on_stop: Callable[[], str] = lambda: "interrupted"
        self._task: asyncio.Task[int] | None = None

    async def guard(self, work: Coroutine[Any, Any, int]) -> int:
        """Run `work` with Ctrl-C handled as the class says; its exit status."""
        loop = asyncio.get_running_loop()
        task = self._task = asyncio.ensure_future(work)
        loop.add_signal_handler(signal.SIGINT, self._signalled)
        try:
            return await task
        except asyncio.CancelledError:
            if not self.count:
                raise
            self.output.say(self.on_stop())
            return EXIT_INTERRUPTED
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def _signalled(self) -> None:
        self.count += 1
        if self.count == 1 and self.on_first is not None and self.on_first():
            return
        if self._task is not None:
            self._task.cancel()
