"""The command line: `rlm-service` (or `python -m rlm_service`).

    rlm-service serve                                   # the service and its page, as `python backend/main.py`
    rlm-service run "Which errors are most frequent?" --input app.log
    cat notes.txt | rlm-service run "Summarize" --server http://127.0.0.1:8000 --json
    rlm-service run "Which errors are most frequent?" --input app.log --server URL --session
    rlm-service run "And on which days?" --follow-up SESSION_ID --server URL
    rlm-service attach RUN_ID --server URL              # follow a run already started, to its end
    rlm-service cancel RUN_ID --server URL
    rlm-service session SESSION_ID --server URL [--end]
    rlm-service sample log > app.log                    # sample data of the demos (`rlm-service sample` lists them)
    rlm-service mcp                                     # the MCP server over stdio, for MCP hosts

`run` executes the engine in the command itself (`cli_local`), or streams a run from a service with
`--server` (`cli_remote`). Progress goes to stderr (iterations, code, a sub-call progress bar); the answer
goes to stdout, so it can be piped. `--json` prints every event as one JSON line instead. Whatever model
or code wrote is printed with its terminal control characters made visible. Exit status: 0 when the run
ended with an answer, 1 when it ended with an `error` event or its stream broke, 2 when it could not
start (bad arguments, configuration, or a refusal by the server), 130 when Ctrl-C stopped it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .client import Refused, RunLost
from .terminal import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, Interrupt, Output


def _read_input(path: str | None, *, stdin_is_input: bool = True) -> tuple[str | None, Path | None]:
    """The input as text (stdin) or as a file path; neither when there is none."""
    if path == "-" or (path is None and stdin_is_input and not sys.stdin.isatty()):
        return sys.stdin.buffer.read().decode("utf-8", "replace"), None
    if path is None:
        return None, None
    file = Path(path)
    if not file.is_file():
        if file.exists():  # a directory, a pipe (`--input <(zcat data.gz)`) or a device: not "no such file"
            raise Refused(
                f"{path} is not a regular file (a directory, a pipe or a device): give a file, or pipe the input to "
                "the command's standard input (--input -)"
            )
        raise Refused(f"no such file: {path}")
    try:  # a file the command may not read (its permissions) ended it with a traceback, or, with --server, was
        with open(file, "rb") as handle:  # blamed on the server ("no answer from ...")
            handle.read(1)
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from None
    return None, file


def _check_run(args: argparse.Namespace) -> None:
    """What `run` cannot do with these arguments, said before anything starts."""
    if not args.prompt.strip():  # as the service refuses it (422); the engine here ran the root model on no task
        raise Refused('the prompt is empty: say what to do with the input, e.g. `run "Summarize" --input notes.txt`')
    if args.follow_up is not None:
        if args.input is not None:
            raise Refused(
                "a follow-up (--follow-up) asks its session, which keeps the input of its first run: "
                "give no --input (to ask about other data, start a new run with --session)"
            )
        if not args.server:
            raise Refused(
                "--follow-up needs --server: a session lives in a service. Without --server, "
                "`run ... --session` asks follow-up questions in the same command (one a line on stdin)"
            )
    if args.session and not args.server and (args.input == "-" or (args.input is None and not sys.stdin.isatty())):
        raise Refused(
            "without --server, --session reads follow-up questions from stdin, so the input must come from --input FILE"
        )


async def _run(args: argparse.Namespace, output: Output, interrupt: Interrupt) -> int:
    _check_run(args)
    overrides = {
        key: value
        for key, value in (
            ("max_iterations", args.max_iterations),
            ("max_subcalls", args.max_subcalls),
            ("exec_timeout_s", args.exec_timeout),
        )
        if value is not None
    }
    if args.keep_input:
        overrides["keep_input"] = True
    text, file = (
        (None, None)
        if args.follow_up
        else _read_input(args.input, stdin_is_input=not (args.session and not args.server))
    )
    if args.server:
        from . import cli_remote

        return await cli_remote.run(args, output, interrupt, text, file, overrides)
    from . import cli_local

    return await cli_local.run(args, output, interrupt, text, file, overrides)


async def _command(args: argparse.Namespace, output: Output) -> int:
    from . import cli_remote

    interrupt = Interrupt(output)
    if args.command == "run":
        return await interrupt.guard(_run(args, output, interrupt))
    if args.command == "attach":
        return await interrupt.guard(cli_remote.attach(args, output, interrupt))
    if args.command == "cancel":
        return await cli_remote.cancel(args, output)
    return await cli_remote.session(args, output)


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _seconds(minimum: float) -> Callable[[str], float]:
    """An argument type: a number of seconds, `minimum` or more (NaN is refused)."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({minimum:g} or more)")
        return value

    return seconds


def _service_options(required: bool) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--server",
        required=required,
        help="a running RLM service (e.g. http://127.0.0.1:8000)" + ("" if required else "; default: run here"),
    )
    options.add_argument("--token", help="bearer token for --server (RLM_API_TOKEN there)")
    return options


def _follow_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--json", action="store_true", help="print every event as one JSON line")
    options.add_argument("--save-figures", type=Path, metavar="DIR", help="write the run's figures there as PNG files")
    options.add_argument(
        "--reconnect-for",
        type=_seconds(0),
        default=120.0,
        metavar="SECONDS",
        help="with --server: how long to keep re-attaching when the connection drops (default 120; 0: do not)",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlm-service", description="The Recursive Language Model service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the API and the web page (configured by environment and .env)")
    serve.add_argument("--host", help="address to listen on (default: HOST, or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT, or 8000)")

    run = commands.add_parser(
        "run", help="run one task and print its answer", parents=[_service_options(False), _follow_options()]
    )
    run.add_argument("prompt", help="what to do with the input (with --follow-up: the next question)")
    run.add_argument("--input", "-i", help="the input file ('-' for stdin; stdin is read when piped)")
    # checked here, as the service checks them: without --server, 0 or NaN ended the command with a traceback
    # they only lower the limits: the server's settings with --server, this command's environment and .env without
    run.add_argument(
        "--max-iterations", type=_positive, metavar="N", help="root turns for this run, at most RLM_MAX_ITERATIONS"
    )
    run.add_argument(
        "--max-subcalls", type=_positive, metavar="N", help="sub-LLM calls for this run, at most RLM_MAX_SUBCALLS"
    )
    run.add_argument(
        "--exec-timeout",
        type=_seconds(1),
        metavar="SECONDS",
        help="seconds per code cell (1 or more), at most RLM_EXEC_TIMEOUT_S",
    )
    run.add_argument("--keep-input", action="store_true", help="keep the input in the run history")
    conversation = run.add_mutually_exclusive_group()
    conversation.add_argument(
        "--session",
        action="store_true",
        help="keep the run's REPL for follow-up questions: with --server the session id is "
        "printed (for --follow-up); without, further questions are read from stdin, one "
        "a line",
    )
    conversation.add_argument(
        "--follow-up",
        metavar="SESSION_ID",
        help="ask this session of --server (from a --session run) the next question; its input "
        "and variables are there already, so give no --input",
    )

    attach = commands.add_parser(
        "attach",
        help="follow a run of --server to its end (Ctrl-C cancels it)",
        parents=[_service_options(True), _follow_options()],
    )
    attach.add_argument("run_id", metavar="RUN_ID")
    attach.add_argument("--after", type=int, default=0, metavar="N", help="only the events after the N-th")

    cancel = commands.add_parser("cancel", help="cancel a run of --server", parents=[_service_options(True)])
    cancel.add_argument("run_id", metavar="RUN_ID")

    session = commands.add_parser(
        "session",
        help="show a session of --server (its runs, when it ends), or end it",
        parents=[_service_options(True)],
    )
    session.add_argument("session_id", metavar="SESSION_ID")
    session.add_argument("--end", action="store_true", help="end it now: its REPL stops and its input is removed")
    session.add_argument("--json", action="store_true", help="print the session as JSON")

    commands.add_parser(
        "mcp", help="serve the MCP tool rlm_run over stdin/stdout, for MCP hosts (configured as serve is)"
    )

    from .demos import DEMOS

    sample = commands.add_parser("sample", help="print a demo's sample data (without a name: list the demos)")
    sample.add_argument("name", nargs="?", choices=sorted(DEMOS), help="which demo")
    sample.add_argument("--count", type=_positive, help="how many log lines, numbers or records")
    sample.add_argument("--seed", type=int, default=0, help="the same seed makes the same data (default 0)")
    return parser


def _mcp() -> int:
    from .mcp_server import serve_stdio
    from .server import configure

    serve_stdio(configure())
    return EXIT_OK


TEXT_ARGUMENTS = ("prompt", "run_id", "session_id", "follow_up", "server", "token")
"""The arguments that go to a server as text (file paths do not: they name files, whatever their bytes)."""


def _as_text(args: argparse.Namespace) -> None:
    """Arguments that are not UTF-8 (a Latin-1 `café`) come from the command line with their bytes as lone
    surrogates, which no request can encode: `attach`, `cancel`, `session` with such an id, and `run` with
    such a prompt and an input file, ended with a traceback. Their undecodable bytes become U+FFFD."""
    for name in TEXT_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.fsencode(value).decode("utf-8", "replace"))


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        return _main(argv, out, err)
    except BrokenPipeError:
        # what reads the output went away (`run ... --json | head -1`): the command leaves quietly, as one that
        # SIGPIPE ends would (a run of a server, detached, goes on there), where it ended with a traceback.
        # The streams go to /dev/null, so that their last flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return EXIT_ERROR


def _main(argv: list[str] | None, out: TextIO | None, err: TextIO | None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = _parser().parse_args(argv)
    _as_text(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "sample":
        return _sample(args, out)
    if args.command == "mcp":
        return _mcp()
    output = Output(out, err, as_json=getattr(args, "json", False), figures_dir=getattr(args, "save_figures", None))
    try:
        return asyncio.run(_command(args, output))
    except Refused as exc:
        output.say(f"error: {exc}")
        return EXIT_REFUSED
    except RunLost as exc:
        output.say(f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        output.say("interrupted")
        return EXIT_INTERRUPTED
