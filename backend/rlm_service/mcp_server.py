"""The MCP server: a tool `rlm_run` that MCP hosts (coding agents, chat apps) call to run an RLM.

Two transports serve the same tool, built on the official `mcp` SDK's `MCPServer`: streamable HTTP at
`/mcp` in the service (behind RLM_API_TOKEN, `mcp_http`), and stdio for local hosts
(`rlm-service mcp`), where the engine runs in that process with the settings `serve` would use. Over
stdio the tool also takes `input_path`, a local file of any size, spooled to disk a chunk at a time.

An RLM run takes minutes, and hosts give up on a tool call that stays silent for tens of seconds, so a
call sends progress notifications (when the host asked for them with a progress token): one when the
run starts, one per iteration, one per sub-call batch, and a heartbeat after RLM_MCP_HEARTBEAT_S of
silence. Cancelling the call cancels the run. The resource `rlm://runs` lists recent runs.

Every run keeps its REPL as a session (`settings.session`): the result carries its `session_id`, and a
call with that `session_id` (and no input) asks a follow-up question on the same input and variables,
whichever process of the instance the call reaches (the one that keeps the session runs it, `fleet`).
Sessions end after RLM_SESSION_IDLE_S idle, or when RLM_MAX_SESSIONS would be passed. When every session
kept has a live run, a new call runs without one, and its result says that it cannot be followed up.

The protocol's long-running tasks (`tasks/*`, 2025-11-25) are not offered: SDK 2.3 defines their types
but does not dispatch them (the 2026-07-28 revision moved them to an extension the SDK does not ship).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import HTTPException
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from .capacity import LocalCapacity
from .config import Settings
from .engine import SHUTTING_DOWN, Engine, RunSettings
from .events import ErrorEvent, Event, EventBase, FinalEvent, StartEvent, SubcallsEvent, is_terminal
from .fleet import Fleet
from .inputs import InputTooLarge, RunInput, spool_file
from .sessions import SessionUnavailable
from .store import StoreUnavailable, off_loop, open_store
from .store_sql import SqlRunStore
from .streaming import RunSlots

RECENT_RUNS = 20
SUBCALLS_EVERY_S = 1.0
INSTRUCTIONS = (
    "rlm_run answers a question about a text input of any size (logs, documents, data dumps) with a "
    "Recursive Language Model: a model that explores the input with Python code and delegates reading "
    "of pieces to a sub-model. Runs take seconds to minutes; progress is reported while they work."
)
TOOL_DESCRIPTION = (
    "Run a Recursive Language Model on an input and return its final answer. The input is never "
    "shown to the model whole: it writes code to search, count and parse it, and asks a sub-model "
    "about pieces. Good for questions about inputs too large to read: whole logs, documents, "
    "datasets. Put the question in `prompt` and the data in `input_text`{path}. The result "
    "has a `session_id`: pass it back with a new prompt (and no input) for a follow-up question "
    "on the same data."
)

Prompt = Annotated[str, Field(description="The task or question about the input.", min_length=1)]
InputText = Annotated[str, Field(description="The input as text (may be empty).")]
SessionId = Annotated[
    str | None,
    Field(
        description="A follow-up: the session_id an earlier rlm_run returned. "
        "The run works on that run's input and variables (send no "
        "input)."
    ),
]
InputPath = Annotated[
    str | None,
    Field(
        description="A file on this machine to use as the input, of any size "
        "(instead of input_text). Relative to the server's working "
        "directory; `~` is expanded."
    ),
]


class Reporter:
    """The progress notifications of one tool call: the run's start, each iteration, each sub-call batch,
    and a heartbeat whenever nothing was sent for `heartbeat_s`. Progress counts the notifications."""

    def __init__(self, send: Callable[[float, str], Awaitable[None]], max_iterations: int, heartbeat_s: float) -> None:
        self._send = send
        self.max_iterations = max_iterations
        self.heartbeat_s = heartbeat_s
        self.sent = 0
        self.started = self.last = time.monotonic()
        self.iteration = 0
        self._batch_total = 0
        self._subcalls_at = 0.0

    async def say(self, message: str) -> None:
        self.sent += 1
        self.last = time.monotonic()
        await self._send(self.sent, message)

    async def event(self, event: EventBase) -> None:
        if isinstance(event, StartEvent):
            await self.say(f"run {event.run_id} started: {event.input.chars:,} characters of input")
            return
        iteration = getattr(event, "iteration", None)
        if isinstance(iteration, int) and iteration > self.iteration:
            self.iteration, self._batch_total = iteration, 0
            await self.say(f"iteration {iteration} of at most {self.max_iterations}")
        if isinstance(event, SubcallsEvent):
            now = time.monotonic()
            new_batch = event.total != self._batch_total
            if new_batch or event.done >= event.total or now - self._subcalls_at >= SUBCALLS_EVERY_S:
                self._batch_total, self._subcalls_at = event.total, now
                failed = f", {event.failed} failed" if event.failed else ""
                await self.say(f"iteration {self.iteration}: sub-calls {event.done}/{event.total} done{failed}")

    async def heartbeat(self) -> None:
        """Forever: a notification after every `heartbeat_s` of silence."""
        while True:
            await anyio.sleep(max(self.last + self.heartbeat_s - time.monotonic(), 0.01))
            if time.monotonic() - self.last >= self.heartbeat_s:
                await self.say(
                    f"still working: iteration {self.iteration}, {time.monotonic() - self.started:.0f} s so far"
                )


class RlmTools:
    """What the MCP tools do with the engine: start a run, report it, return its answer."""

    def __init__(
        self,
        settings: Settings,
        slots: RunSlots,
        engine: Callable[[], Engine],
        fleet: Callable[[], Fleet | None] = lambda: None,
    ) -> None:
        """`fleet`: the other processes of the instance, when there are any (a follow-up on a session one of
        them keeps is run there, as `POST /process` does)."""
        self.settings = settings
        self.slots = slots
        self.engine = engine
        self.fleet = fleet

    async def run(
        self,
        ctx: Context[Any, Any],
        prompt: str,
        run_input: Callable[[], Awaitable[RunInput]],
        session_id: str | None = None,
    ) -> CallToolResult:
        """One `rlm_run` call: refusals as tool errors, the run reported as progress, its answer returned."""
        settings = self.settings
        problem = settings.setup_problem()
        if problem:
            raise ToolError(problem)
        if not prompt.strip():  # as POST /process refuses it: a run without a task costs model calls for nothing
            raise ToolError("the prompt must not be empty: say what to do with the input")
        if len(prompt) > settings.rlm_max_prompt_chars:
            raise ToolError(
                f"the prompt has {len(prompt):,} characters, more than RLM_MAX_PROMPT_CHARS "
                f"({settings.rlm_max_prompt_chars:,}): put long text in the input"
            )
        try:
            self.slots.refuse_if_full()  # before the input is read: all runs taken, or the server stopping
        except HTTPException as exc:
            raise ToolError(str(exc.detail)) from None
        given = await run_input()
        try:
            if session_id is not None and given.chars:
                raise ToolError("a follow-up (session_id) works on its session's input: send no input")
            fleet = self.fleet()
            if session_id is not None and fleet is not None and self.engine().sessions.get(session_id) is None:
                given.discard()
                return await self._follow_up_elsewhere(ctx, fleet, prompt, session_id)
            if session_id is None:
                self.slots.refuse_if_full()  # first: making room may end another process's idle session
                await self.engine().sessions.make_room()
            unkept = None
            try:
                run = self.slots.start(
                    lambda: self.engine().launch(prompt, given, RunSettings(session=True), session_id=session_id)
                )
            except SessionUnavailable as exc:
                if session_id is not None or exc.status != 429:
                    raise
                # Every session is busy with a run: the answer is what was asked for, a follow-up on it only
                # an offer, so the call runs without one rather than being refused.
                run = self.slots.start(lambda: self.engine().launch(prompt, given, RunSettings(session=False)))
                unkept = f"no session was kept for follow-ups on this answer: {exc}"
        except BaseException as exc:
            given.discard()
            if isinstance(exc, SessionUnavailable):
                raise ToolError(str(exc)) from None
            if isinstance(exc, HTTPException):
                raise ToolError(str(exc.detail)) from None
            raise
        run.on_end(lambda _: given.discard())
        try:
            await self._report(ctx, run.follow())
        finally:
            if not run.ended:
                run.cancel("the MCP client cancelled the tool call")
        return result_of(run.events[-1], run.id, run.session_id, unkept=unkept)

    async def _follow_up_elsewhere(
        self, ctx: Context[Any, Any], fleet: Fleet, prompt: str, session_id: str
    ) -> CallToolResult:
        """A follow-up on a session another process of the instance keeps: that process runs it, and its events
        come through the database (cancelling the call cancels the run there)."""
        try:
            run_id = await fleet.follow_up(prompt, RunSettings(session=True), session_id)
        except (SessionUnavailable, StoreUnavailable) as exc:
            raise ToolError(str(exc)) from None
        with self.slots.holding(lambda: fleet.cancel_soon(run_id, SHUTTING_DOWN)):
            terminal = await self._report(ctx, fleet.owned(run_id, detached=False))
        return result_of(terminal, run_id, session_id)

    async def _report(self, ctx: Context[Any, Any], events: AsyncIterator[Event]) -> Event:
        """A run's events as progress, with a heartbeat in the silences; its terminal event."""
        reporter = Reporter(
            lambda n, message: ctx.report_progress(n, None, message),
            self.settings.rlm_max_iterations,
            self.settings.rlm_mcp_heartbeat_s,
        )
        last: Event | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(reporter.heartbeat)
            async for event in events:
                await reporter.event(event)
                last = event
            group.cancel_scope.cancel()
        assert last is not None and is_terminal(last)
        return last

    def text_input(self, text: str) -> Callable[[], Awaitable[RunInput]]:
        async def make() -> RunInput:
            given = RunInput.from_text(text)
            if given.size_bytes > self.settings.rlm_max_input_bytes:
                raise ToolError(
                    f"input_text is larger than RLM_MAX_INPUT_BYTES ({self.settings.rlm_max_input_bytes:,} bytes)"
                )
            return given

        return make

    def file_input(self, path: str) -> Callable[[], Awaitable[RunInput]]:
        def spool() -> RunInput:
            file = Path(path).expanduser()
            if not file.is_file():
                raise ToolError(f"input_path: no such file: {file}")
            try:
                return spool_file(file, self.settings.rlm_max_input_bytes)
            except InputTooLarge as exc:
                raise ToolError(f"input_path: {exc}") from None
            except OSError as exc:
                raise ToolError(f"input_path: cannot read {file}: {exc.strerror or exc}") from None

        async def make() -> RunInput:
            spooling = asyncio.ensure_future(asyncio.to_thread(spool))
            try:
                return await asyncio.shield(spooling)
            except asyncio.CancelledError:  # the call was cancelled: the copy, which cannot be stopped, is removed
                spooling.add_done_callback(_discard_spooled)
                raise

        return make

    def recent_runs(self) -> str:
        """Recent runs, newest first: from the history when it is on, else the runs in progress."""
        engine = self.engine()
        if engine.store is not None:
            runs = [summary.to_dict() for summary in engine.store.list(limit=RECENT_RUNS, before=None)]
        else:
            runs = [{"id": run.id, "status": "running"} for run in engine.runs.live()]
        return json.dumps({"runs": runs}, ensure_ascii=False)


def _discard_spooled(spooling: asyncio.Future[RunInput]) -> None:
    if not spooling.cancelled() and spooling.exception() is None:
        spooling.result().discard()


def result_of(terminal: Event, run_id: str, session_id: str | None, *, unkept: str | None = None) -> CallToolResult:
    """The tool's result from the run's terminal event: the final answer (with a note when it was not marked
    ready, and `unkept`, why it has no session, if it has none for that reason); a failed run is a tool error
    that says why."""
    if isinstance(terminal, ErrorEvent):
        so_far = f"\nThe answer so far:\n{terminal.answer}" if terminal.answer else ""
        raise ToolError(f"The run failed ({terminal.code}): {terminal.message}{so_far}")
    assert isinstance(terminal, FinalEvent)
    content = [TextContent(type="text", text=terminal.answer or "(no answer)")]
    if terminal.note:
        content.append(TextContent(type="text", text=f"Note: {terminal.note}"))
    elif not terminal.ready:
        content.append(
            TextContent(
                type="text",
                text="Note: the run reached its limits before it marked the "
                "answer ready; this is its best answer so far.",
            )
        )
    structured = {
        "answer": terminal.answer,
        "ready": terminal.ready,
        "run_id": run_id,
        "iterations": terminal.iterations,
        "usage": terminal.usage.model_dump(),
    }
    if session_id is not None:
        structured["session_id"] = session_id
        content.append(
            TextContent(
                type="text",
                text=f"session_id: {session_id} (call rlm_run with it and a "
                "new prompt, and no input, for a follow-up on the same data)",
            )
        )
    elif unkept is not None:
        content.append(TextContent(type="text", text=f"Note: {unkept}"))
    return CallToolResult(content=list(content), structured_content=structured)


def build_server(
    tools: RlmTools, *, local_files: bool, lifespan: Callable[[MCPServer[Any]], Any] | None = None
) -> MCPServer[Any]:
    """The MCP server with `rlm_run` (with `input_path` when `local_files`) and the `rlm://runs` resource."""
    server: MCPServer[Any] = MCPServer("rlm-service", instructions=INSTRUCTIONS, log_level="WARNING", lifespan=lifespan)

    if local_files:

        async def rlm_run_local(
            prompt: Prompt,
            ctx: Context[Any, Any],
            input_text: InputText = "",
            input_path: InputPath = None,
            session_id: SessionId = None,
        ) -> CallToolResult:
            if input_path and input_text:
                raise ToolError("give input_text or input_path, not both")
            given = tools.file_input(input_path) if input_path else tools.text_input(input_text)
            return await tools.run(ctx, prompt, given, session_id)

        server.add_tool(
            rlm_run_local,
            name="rlm_run",
            description=TOOL_DESCRIPTION.format(path=", or a local file's path in `input_path`"),
        )
    else:

        async def rlm_run(
            prompt: Prompt,
            ctx: Context[Any, Any],
            input_text: InputText = "",
            session_id: SessionId = None,
            input_path: SkipJsonSchema[str | None] = None,  # taken only to be refused: not in the tool's schema
        ) -> CallToolResult:
            if input_path:  # else ignored, the run would have gone on with no input at all
                raise ToolError(
                    "input_path names a file on the server's machine and is served over stdio only "
                    "(rlm-service mcp); over HTTP, send the input's text in input_text"
                )
            return await tools.run(ctx, prompt, tools.text_input(input_text), session_id)

        server.add_tool(rlm_run, name="rlm_run", description=TOOL_DESCRIPTION.format(path=""))

    @server.resource(
        "rlm://runs",
        name="recent-runs",
        mime_type="application/json",
        description=f"The {RECENT_RUNS} most recent runs (with history on; else the runs in progress).",
    )
    async def recent_runs() -> str:
        return await off_loop(tools.recent_runs)

    return server


def serve_stdio(settings: Settings) -> None:
    """`rlm-service mcp`: serve the tools over stdin/stdout until the host closes them."""
    engines: list[Engine] = []
    fleets: list[Fleet] = []
    slots = RunSlots(LocalCapacity(settings.rlm_max_concurrent_runs))

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        store = await anyio.to_thread.run_sync(open_store, settings)
        engine = Engine(settings, store=store)
        await engine.start()
        engines.append(engine)
        try:
            if settings.coordinated and isinstance(store, SqlRunStore):
                # A history the service's servers share: this process joins them as one of theirs (a heartbeat,
                # its runs' owner), so that its runs can be followed and cancelled through them, and end as `lost`
                # for them if it dies, rather than stay `running` in the history for ever.
                fleet = Fleet(settings, store, engine, launch=slots.follow_up_launcher(lambda: engine))
                await fleet.start()
                fleets.append(fleet)
            yield None
        finally:
            await engine.aclose()  # its runs cancelled, its sessions ended
            for fleet in fleets:
                await fleet.stop()
            if store is not None:
                store.close()

    tools = RlmTools(settings, slots, lambda: engines[0], lambda: fleets[0] if fleets else None)
    build_server(tools, local_files=True, lifespan=lifespan).run("stdio")
