"""The command line: run a task against the engine directly, or against a running server.

    python -m rlm_service run "Which errors are most frequent?" --input app.log
    cat notes.txt | python -m rlm_service run "Summarize" --server http://127.0.0.1:8000 --json

Progress goes to stderr (iterations, code, a sub-call progress bar); the answer goes to stdout, so it
can be piped. `--json` prints every event as one JSON line instead. Exit status: 0 when the run ended
with an answer, 1 when it ended with an `error` event, 2 when it could not start (bad arguments,
configuration, or a refusal by the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2


class Refused(Exception):
    """The run could not start; the message says why."""


class SseFrames:
    """Server-Sent Events fed one line at a time: `event:` names, `data:` lines joined (one space after
    the colon dropped, as the format says), comments skipped, a blank line completing an event."""

    def __init__(self) -> None:
        self.name, self.data = "message", []

    def feed(self, line: str) -> tuple[str, Any] | None:
        """The (name, parsed JSON data) this line completes, or None."""
        if line == "":
            event = (self.name, json.loads("\n".join(self.data))) if self.data else None
            self.name, self.data = "message", []
            return event
        if line.startswith("event:"):
            self.name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(" ") else value)
        return None


class ProgressPrinter:
    """Human-readable progress on a terminal (or a log, when stderr is not one)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._bar_shown = False

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "start":
            info = data.get("input", {})
            self._line(f"run {data.get('run_id')}: {data.get('model')} (sub: {data.get('sub_model')}), "
                       f"input {info.get('chars', 0):,} characters, {info.get('lines', 0):,} lines")
        elif name == "thought":
            first = str(data.get("text", "")).strip().splitlines()[0:1]
            self._line(f"[{data.get('iteration')}] {first[0][:100] if first else ''}")
        elif name == "code":
            lines = str(data.get("code", "")).strip().splitlines()
            more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
            self._line(f"[{data.get('iteration')}] >>> {lines[0][:90] if lines else ''}{more}")
        elif name == "subcalls":
            self._bar(int(data.get("done", 0)), int(data.get("failed", 0)), int(data.get("total", 0)))
        elif name == "output":
            error = data.get("error")
            shown = str(error).strip().splitlines()[-1] if error else str(data.get("stdout", "")).strip()
            self._line(f"    {'error: ' if error else ''}{shown[:200]} ({data.get('duration_ms', 0)} ms)")
        elif name == "figure":
            self._line(f"    [figure, {len(str(data.get('data', ''))) * 3 // 4:,} bytes of PNG]")
        elif name == "final":
            usage = data.get("usage", {})
            root, sub = usage.get("root", {}), usage.get("sub", {})
            state = "ready" if data.get("ready") else "NOT ready (iteration limit or no code)"
            self._line(f"done: {state}, {data.get('iterations')} iterations, {root.get('requests', 0)} root and "
                       f"{sub.get('requests', 0)} sub requests, {data.get('elapsed_ms', 0) / 1000:.1f} s")
        elif name == "error":
            self._line(f"error ({data.get('code')}): {data.get('message')}")
        elif name == "child":
            self._child(int(data.get("depth", 1)), str(data.get("event")), data.get("data") or {})

    def _child(self, depth: int, kind: str, data: dict[str, Any]) -> None:
        prefix = "    " * depth + f"↳ child (depth {depth})"
        if kind == "start":
            self._line(f"{prefix} started on {data.get('input', {}).get('chars', 0):,} characters")
        elif kind == "code":
            lines = str(data.get("code", "")).strip().splitlines()
            self._line(f"{prefix} [{data.get('iteration')}] >>> {lines[0][:80] if lines else ''}")
        elif kind == "final":
            self._line(f"{prefix} answered: {str(data.get('answer', '')).strip()[:100]!r}")
        elif kind == "error":
            self._line(f"{prefix} failed ({data.get('code')}): {data.get('message')}")

    def _bar(self, done: int, failed: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
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


def _read_input(path: str | None) -> tuple[str | None, Path | None]:
    """The input as text (stdin) or as a file path; neither when there is none."""
    if path == "-" or (path is None and not sys.stdin.isatty()):
        return sys.stdin.buffer.read().decode("utf-8", "replace"), None
    if path is None:
        return None, None
    file = Path(path)
    if not file.is_file():
        raise Refused(f"no such file: {path}")
    return None, file


async def _engine_events(prompt: str, text: str | None, file: Path | None,
                         settings_overrides: dict[str, Any]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    from .config import ConfigError, load_settings
    from .engine import Engine, RunSettings, SettingsRefused, effective_limits
    from .inputs import InputTooLarge

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None
    problem = settings.setup_problem()
    if problem:
        raise Refused(problem)
    run_settings = RunSettings(**settings_overrides)
    try:
        effective_limits(settings, run_settings)
    except SettingsRefused as exc:
        raise Refused(str(exc)) from None
    run_input: Any = text or ""
    if file is not None:
        try:
            run_input = await asyncio.to_thread(_spool, file, settings.rlm_max_input_bytes)
        except InputTooLarge as exc:
            raise Refused(str(exc)) from None
    async with Engine(settings) as engine:
        async for event in engine.run(prompt, run_input, run_settings):
            yield event.type, event.model_dump(mode="json")


def _spool(file: Path, limit: int) -> Any:
    """Copy the input file to the run's spool as UTF-8 (what an upload to the server does too)."""
    from .inputs import InputSpooler

    spooler = InputSpooler(limit, name=file.name)
    with open(file, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            spooler.feed(chunk)
    return spooler.finish()


async def _server_events(url: str, token: str | None, prompt: str, text: str | None, file: Path | None,
                         settings_overrides: dict[str, Any]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    import httpx2

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10)) as client:
        if file is not None:
            with open(file, "rb") as handle:  # noqa: ASYNC230 - the client streams it as it reads
                files = {"prompt": (None, prompt), "settings": (None, json.dumps(settings_overrides)),
                         "input_file": (file.name, handle, "text/plain")}
                async for item in _stream(client, url, headers, files=files):
                    yield item
        else:
            body = {"prompt": prompt, "input_data": text or "", "settings": settings_overrides}
            async for item in _stream(client, url, headers, json=body):
                yield item


async def _stream(client: Any, url: str, headers: dict[str, str],
                  **request: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    import httpx2

    try:
        async with client.stream("POST", url.rstrip("/") + "/process", headers=headers, **request) as response:
            if response.status_code != 200:
                await response.aread()
                try:
                    detail = response.json().get("detail")
                except ValueError:
                    detail = response.text[:300]
                raise Refused(f"the server refused the run ({response.status_code}): {detail}")
            frames = SseFrames()
            async for line in response.aiter_lines():
                if (event := frames.feed(line)) is not None:
                    yield event
    except httpx2.TransportError as exc:
        raise Refused(f"could not reach {url}: {exc}") from None


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    overrides = {key: value for key, value in (("max_iterations", args.max_iterations),
                                               ("max_subcalls", args.max_subcalls),
                                               ("exec_timeout_s", args.exec_timeout)) if value is not None}
    if args.keep_input:
        overrides["keep_input"] = True
    text, file = _read_input(args.input)
    events = (_server_events(args.server, args.token, args.prompt, text, file, overrides) if args.server
              else _engine_events(args.prompt, text, file, overrides))
    progress = ProgressPrinter(err)
    status = EXIT_ERROR
    async for name, data in events:
        if args.json:
            out.write(json.dumps({"event": name, **data}, ensure_ascii=False) + "\n")
            out.flush()
        else:
            progress.event(name, data)
        if name == "final":
            status = EXIT_OK
            if not args.json:
                out.write(str(data.get("answer", "")).rstrip("\n") + "\n")
        elif name == "error":
            status = EXIT_ERROR
    return status


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m rlm_service", description="Recursive Language Model runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one task and print its answer")
    run.add_argument("prompt", help="what to do with the input")
    run.add_argument("--input", "-i", help="the input file ('-' for stdin; stdin is read when piped)")
    run.add_argument("--server", help="a running RLM service (e.g. http://127.0.0.1:8000); default: run here")
    run.add_argument("--token", help="bearer token for --server (RLM_API_TOKEN there)")
    run.add_argument("--json", action="store_true", help="print every event as one JSON line")
    run.add_argument("--max-iterations", type=int)
    run.add_argument("--max-subcalls", type=int)
    run.add_argument("--exec-timeout", type=float, help="seconds per code cell")
    run.add_argument("--keep-input", action="store_true", help="keep the input in the run history")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args, out, err))
    except Refused as exc:
        err.write(f"error: {exc}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return EXIT_ERROR
