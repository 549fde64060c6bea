"""The command line without `--server`: the engine runs in the command itself, configured like the server
(environment and `.env` files).

A session cannot outlive the command here, so `--session` makes the command a conversation: after the
first answer it reads follow-up questions from stdin, one a line, each a run on the same REPL (every
variable of earlier questions still there), until end of input (Ctrl-D). The input then has to come from
`--input FILE`, since stdin brings the questions. Ctrl-C cancels the run that is going and ends the command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from .client import Refused
from .config import ConfigError, Settings, load_settings
from .engine import Engine, RunSettings, SettingsRefused, effective_limits
from .inputs import InputTooLarge, RunInput, spool_file
from .sessions import SessionUnavailable
from .terminal import EXIT_ERROR, EXIT_INTERRUPTED, Interrupt, Output, printable

LIMITS = ("max_iterations", "max_subcalls", "exec_timeout_s")


def configured(overrides: dict[str, Any]) -> tuple[Settings, RunSettings]:
    """The settings, and the run's own within them; `Refused` with one line when either is wrong."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None
    problem = settings.setup_problem()
    if problem:
        raise Refused(problem)
    run_settings = RunSettings(**overrides)
    try:
        effective_limits(settings, run_settings)
    except SettingsRefused as exc:
        raise Refused(str(exc)) from None
    return settings, run_settings


async def run(
    args: argparse.Namespace,
    output: Output,
    interrupt: Interrupt,
    text: str | None,
    file: Path | None,
    overrides: dict[str, Any],
) -> int:
    """`run` without `--server`: one question, or with `--session` a conversation read from stdin."""
    settings, run_settings = configured({**overrides, "session": bool(args.session)})
    run_input = RunInput.from_text(text or "")
    if file is not None:
        try:
            run_input = await asyncio.to_thread(spool_file, file, settings.rlm_max_input_bytes)
        except InputTooLarge as exc:
            raise Refused(str(exc)) from None
    async with Engine(settings) as engine:
        status = await _ask(engine, output, interrupt, args.prompt, run_input, run_settings)
        session_id = output.session_id
        if not args.session or status == EXIT_INTERRUPTED or session_id is None:
            return status
        if engine.sessions.get(session_id) is None:
            output.say("the session was not kept: the run ended before its REPL started")
            return status
        output.say(
            f"session {session_id}: ask follow-up questions, one a line; end of input (Ctrl-D) ends the "
            "session and the command"
        )
        follow_up = RunSettings(**{name: value for name, value in overrides.items() if name in LIMITS})
        async for question in _questions(sys.stdin.buffer, output):
            try:
                asked = await _ask(
                    engine, output, interrupt, question, RunInput.from_text(""), follow_up, session_id=session_id
                )
            except SessionUnavailable as exc:
                output.say(f"the session ended: {exc}")
                return EXIT_ERROR
            if asked == EXIT_INTERRUPTED:
                return asked
            status = max(status, asked)
        return status


async def _ask(
    engine: Engine,
    output: Output,
    interrupt: Interrupt,
    prompt: str,
    run_input: RunInput,
    run_settings: RunSettings,
    *,
    session_id: str | None = None,
) -> int:
    """One run in the engine, printed as it goes; Ctrl-C cancels it. Its exit status."""
    live = engine.launch(prompt, run_input, run_settings, session_id=session_id)

    def stop() -> bool:
        if live.cancel("Ctrl-C in the command line"):
            output.say(f"cancelling run {live.id} (Ctrl-C again to stop at once)")
        return True

    interrupt.on_first = stop
    try:
        async for event in live.follow():
            data = event.model_dump(mode="json")
            output.event(data["type"], data)
    finally:
        interrupt.on_first = None
    if interrupt.count and output.cancelled:
        output.say(f"run {live.id} cancelled (Ctrl-C)")
        return EXIT_INTERRUPTED
    return output.status


async def _questions(stream: BinaryIO, output: Output) -> AsyncIterator[str]:
    """The non-empty lines of `stream`, each as it comes; a prompt before each when a person types them.
    A thread reads them (a daemon: the command does not wait for a line nobody types)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the command ended while a line was being read
            pass

    def read() -> None:
        for raw in stream:
            put(raw.decode("utf-8", "replace"))
        put(None)

    threading.Thread(target=read, name="rlm-questions", daemon=True).start()
    person = stream.isatty()
    while True:
        if person:
            output.progress.stream.write("follow-up> ")
            output.progress.stream.flush()
        line = await lines.get()
        if line is None:
            return
        question = line.strip()
        if question:
            if not person:
                output.say(f"> {printable(question)[:200]}")
            yield question
