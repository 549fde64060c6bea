"""The command line: `rlm-service` (or `python -m rlm_service`).

    rlm-service serve                                   # the service and its page, as `python backend/main.py`
    rlm-service run "Which errors are most frequent?" --input app.log
    cat notes.txt | rlm-service run "Summarize" --server http://127.0.0.1:8000 --json
    rlm-service sample log > app.log                    # sample data of the demos (`rlm-service sample` lists them)
    rlm-service mcp                                     # the MCP server over stdio, for MCP hosts

`run` executes the engine in the command itself, or streams a run from a service with `--server`.
Progress goes to stderr (iterations, code, a sub-call progress bar); the answer goes to stdout, so it
can be piped. `--json` prints every event as one JSON line instead. Whatever model or code wrote is
printed with its terminal control characters made visible. Exit status: 0 when the run ended with an
answer, 1 when it ended with an `error` event or its stream broke, 2 when it could not start (bad
arguments, configuration, or a refusal by the server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from .client import Refused, RunLost, server_events
from .terminal import ProgressPrinter, json_line, printable

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2


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
    from .inputs import InputTooLarge, spool_file

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
            run_input = await asyncio.to_thread(spool_file, file, settings.rlm_max_input_bytes)
        except InputTooLarge as exc:
            raise Refused(str(exc)) from None
    async with Engine(settings) as engine:
        async for event in engine.run(prompt, run_input, run_settings):
            data = event.model_dump(mode="json")
            yield data["type"], data


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    overrides = {key: value for key, value in (("max_iterations", args.max_iterations),
                                               ("max_subcalls", args.max_subcalls),
                                               ("exec_timeout_s", args.exec_timeout)) if value is not None}
    if args.keep_input:
        overrides["keep_input"] = True
    text, file = _read_input(args.input)
    events = (server_events(args.server, args.token, args.prompt, text, file, overrides) if args.server
              else _engine_events(args.prompt, text, file, overrides))
    progress = ProgressPrinter(err)
    status, figures = EXIT_ERROR, 0
    async for name, data in events:
        if args.json:
            out.write(json_line({"event": name, **data}) + "\n")
            out.flush()
        else:
            progress.event(name, data)
        if name == "figure" and args.save_figures is not None:
            figures += 1
            err.write(f"    {_save_figure(args.save_figures, data, figures)}\n")
        if name == "final":
            status = EXIT_OK
            if not args.json:
                out.write(printable(str(data.get("answer", ""))).rstrip("\n") + "\n")
        elif name == "error":
            status = EXIT_ERROR
    return status


def _save_figure(directory: Path, data: dict[str, Any], number: int) -> str:
    """Write a `figure` event's PNG as `figure-<number>.png` in `directory`; says what was done."""
    try:
        png = base64.b64decode(str(data.get("data", "")), validate=True)
    except binascii.Error:
        return f"figure {number} was not valid base64; not saved"
    if data.get("mime", "image/png") != "image/png" or not png.startswith(b"\x89PNG"):
        return f"figure {number} is not a PNG; not saved"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"figure-{number}.png"
    path.write_bytes(png)
    return f"saved {path}"


def _sample(args: argparse.Namespace, out: TextIO) -> int:
    from .demos import DEMOS, sample

    if args.name is None:
        for demo in DEMOS.values():
            out.write(f"{demo.name}: {demo.prompt}\n")
        return EXIT_OK
    out.write(sample(args.name, args.count, args.seed))
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .server import build_app, configure, serve

    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    settings = configure(**overrides)
    serve(settings, build_app(settings))
    return EXIT_OK


def _mcp() -> int:
    from .mcp_server import serve_stdio
    from .server import configure

    serve_stdio(configure())
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlm-service", description="The Recursive Language Model service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the API and the web page (configured by environment and .env)")
    serve.add_argument("--host", help="address to listen on (default: HOST, or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT, or 8000)")

    commands.add_parser("mcp", help="serve the MCP tool rlm_run over stdin/stdout, for MCP hosts (configured as "
                                    "serve is)")

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
    run.add_argument("--save-figures", type=Path, metavar="DIR", help="write the run's figures there as PNG files")

    from .demos import DEMOS

    sample = commands.add_parser("sample", help="print a demo's sample data (without a name: list the demos)")
    sample.add_argument("name", nargs="?", choices=sorted(DEMOS), help="which demo")
    sample.add_argument("--count", type=_positive, help="how many log lines, numbers or records")
    sample.add_argument("--seed", type=int, default=0, help="the same seed makes the same data (default 0)")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "sample":
        return _sample(args, out)
    if args.command == "mcp":
        return _mcp()
    try:
        return asyncio.run(_run(args, out, err))
    except Refused as exc:
        err.write(f"error: {printable(str(exc))}\n")
        return EXIT_REFUSED
    except RunLost as exc:
        err.write(f"error: {printable(str(exc))}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return EXIT_ERROR
