"""The command line against a running service (`--server URL`): runs, follow-ups, attaching, cancelling, sessions.

Runs started here are detached on the service, so the command can lose its connection, re-attach by
itself and go on (`client.RunStream`), and can be killed without ending the run (`attach` follows it
again). Ctrl-C is the one way the command ends a run: it asks the service to cancel it
(`POST /api/runs/{id}/cancel`), shows the run's `error` event, and exits with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from .client import Refused, RunOver, RunStream, ServiceClient
from .terminal import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, Interrupt, Output, json_line, printable


class RunCancel:
    """Ctrl-C on a run of the service: ask the service to cancel it and let its `error` event end the stream."""

    def __init__(self, client: ServiceClient, stream: RunStream, output: Output) -> None:
        self.client = client
        self.stream = stream
        self.output = output
        self.requested = False
        self.pending = False
        """Ctrl-C came after the service took the run but before it named it: cancel it once named."""
        self._task: asyncio.Future[None] | None = None

    def interrupted(self) -> bool:
        """The first Ctrl-C; False when there is no run yet (the command then stops at once: none is left)."""
        if self.stream.run_id is None:
            if not self.stream.answered:
                return False
            self.pending = True
            self.output.say("cancelling the run as soon as the service names it (Ctrl-C again to stop waiting)")
            return True
        self.send()
        return True

    def event_seen(self) -> None:
        if self.pending and self.stream.run_id is not None and not self.stream.ended:
            self.send()

    def send(self) -> None:
        self.pending, self.requested = False, True
        run = printable(self.stream.run_id or "?")
        self.output.say(f"cancelling run {run} (Ctrl-C again to stop waiting for it)")
        self._task = asyncio.ensure_future(self._cancel(run))

    async def _cancel(self, run: str) -> None:
        try:
            if not await self.client.cancel(self.stream.run_id or ""):
                self.output.say(f"run {run} had already ended")
        except Refused as exc:
            self.output.say(
                f"could not cancel run {run}: {exc}; it goes on on the service within its limits "
                "(Ctrl-C again to stop waiting for it)"
            )

    def stopped(self) -> str:
        """The line for a command stopped before its run's last event."""
        run, base = printable(self.stream.run_id or ""), self.client.base
        if not run:
            return "interrupted before the run started"
        if self.requested:
            return f"stopped waiting for run {run}, which was asked to stop ({base}/api/runs/{run} shows how it ended)"
        return (
            f"stopped; run {run} goes on on the service: `rlm-service attach {run} --server {base}` follows it, "
            f"`rlm-service cancel {run} --server {base}` stops it"
        )


async def follow(client: ServiceClient, stream: RunStream, output: Output, interrupt: Interrupt) -> int:
    """Print a run's events to its end; its exit status."""
    cancel = RunCancel(client, stream, output)
    interrupt.on_first, interrupt.on_stop = cancel.interrupted, cancel.stopped
    try:
        async for name, data in stream:
            output.event(name, data)
            cancel.event_seen()
    except RunOver as over:
        output.say(_ended_before(client, stream, over))
        # the status its terminal event earns (`Output.status`): `finished` is the run that ended with `final`
        return EXIT_OK if over.run.get("status") == "finished" else EXIT_ERROR
    if cancel.requested and output.cancelled:
        output.say(f"run {printable(stream.run_id or '?')} cancelled (Ctrl-C)")
        return EXIT_INTERRUPTED
    return output.status


def _ended_before(client: ServiceClient, stream: RunStream, over: RunOver) -> str:
    """The line for a run that has ended with no events after those asked for: how it ended, how to see them."""
    run, after = printable(stream.run_id or "?"), printable(stream.last_id or "0")
    status, error = over.run.get("status"), over.run.get("error")
    if status == "finished":
        how = "finished with an answer" + (", not marked ready" if over.run.get("ready") is False else "")
    elif isinstance(error, dict) and error.get("code"):
        how = f"{status}: {error['code']}"
    else:
        how = str(status)
    said = f"run {run} has ended ({printable(how)}) and has no events after {after}"
    if over.last < 1:
        return f"{said}: it has none"
    return (
        f"{said}: its events are numbered 1 to {over.last}; `rlm-service attach {run} --server {client.base} "
        f"--after {over.last - 1}` shows the last one, without --after all of them"
    )


def client_for(args: argparse.Namespace, output: Output) -> ServiceClient:
    return ServiceClient(args.server, args.token, reconnect_s=getattr(args, "reconnect_for", 0.0), notify=output.say)


async def run(
    args: argparse.Namespace,
    output: Output,
    interrupt: Interrupt,
    text: str | None,
    file: Path | None,
    settings: dict[str, Any],
) -> int:
    """`run --server`: a new run (kept as a session with `--session`) or a follow-up question on a session."""
    async with client_for(args, output) as client:
        if args.session:
            settings = {**settings, "session": True}
        stream = client.start(args.prompt, text, file, settings, session_id=args.follow_up)
        status = await follow(client, stream, output, interrupt)
        if (args.session or args.follow_up) and output.session_id and status != EXIT_INTERRUPTED:
            await _tell_session(client, output, output.session_id)
        return status


async def _tell_session(client: ServiceClient, output: Output, session_id: str) -> None:
    """Say how to ask the session more, and until when it waits; or that it was not kept."""
    sid, base = printable(session_id), client.base
    try:
        info = await client.session(session_id)
    except Refused as exc:
        output.say(f"the session was not kept: {exc}")
        return
    expires = _clock(info.get("expires_at"))
    until = f", and ends if left idle until {expires}" if expires else ""
    output.say(
        f"session {sid}: ask more with `rlm-service run QUESTION --follow-up {sid} --server {base}`; "
        f"it keeps the input and every variable{until} (`rlm-service session {sid} --end --server {base}` "
        "ends it now)"
    )


def _clock(when: object) -> str | None:
    """A time the service gave (Unix seconds) as local time; None for what cannot be one (NaN, 1e300, text)."""
    if not isinstance(when, (int, float)):
        return None
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    except (ValueError, OverflowError, OSError):
        return None


async def attach(args: argparse.Namespace, output: Output, interrupt: Interrupt) -> int:
    """`attach RUN_ID`: a run's events (after `--after N`), then live until it ends; for a run that has ended
    with no events after N, how it ended."""
    async with client_for(args, output) as client:
        return await follow(client, client.attach(args.run_id, args.after), output, interrupt)


async def cancel(args: argparse.Namespace, output: Output) -> int:
    """`cancel RUN_ID`: ask the service to end a run."""
    async with client_for(args, output) as client:
        run = printable(args.run_id)
        if await client.cancel(args.run_id):
            output.say(f"run {run} is being cancelled (its stream ends with error `cancelled`)")
            return EXIT_OK
        output.say(f"run {run} has already ended: nothing to cancel")
        return EXIT_REFUSED


async def session(args: argparse.Namespace, output: Output) -> int:
    """`session SESSION_ID`: what the session holds and until when; `--end` ends it."""
    async with client_for(args, output) as client:
        sid = printable(args.session_id)
        if args.end:
            await client.end_session(args.session_id)
            output.say(f"session {sid} ended: its REPL is stopped and its input removed from the service")
            return EXIT_OK
        info = await client.session(args.session_id)
    if output.as_json:
        output.out.write(json_line(info) + "\n")
        return EXIT_OK
    # what the service sends, of the types it sends them; a field of another type (a server that is not the
    # service, or a broken one) is left out, where it ended the command with a traceback
    listed = info.get("runs")
    runs = [printable(str(run)) for run in listed] if isinstance(listed, list) else []
    source = info.get("input")
    lines = [f"session {sid}", f"runs: {', '.join(runs) if runs else 'none yet'}"]
    if info.get("live_run"):
        lines.append(f"live run: {printable(str(info['live_run']))}")
    if isinstance(source, dict) and isinstance(source.get("chars"), int) and isinstance(source.get("lines", 0), int):
        lines.append(f"input: {source['chars']:,} characters, {source.get('lines', 0):,} lines")
    if expires := _clock(info.get("expires_at")):
        lines.append(f"ends if left idle until {expires}")
    output.out.write("\n".join(lines) + "\n")
    return EXIT_OK
