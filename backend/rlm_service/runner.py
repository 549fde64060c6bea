"""One run tree from its start to its terminal event: the root run, its REPL, its children.

`RunDriver.drive` is the task behind a `LiveRun`. It sets up the root run's workspace and REPL (or takes
a session's), runs the `Controller`, and emits exactly one `final` or `error`. Child runs (`rlm_batch`
where the tree allows recursion) get workspaces and REPLs of their own and report through `child`
events in the root's stream.

What cancels what: cancelling the driver task (a client leaving a run it owns, `POST …/cancel`, the
server shutting down) cancels the root model request or the cell in flight; the cell's pending
sub-calls and child runs are cancelled with it; the `finally` blocks kill the workers of the run's own
REPLs and remove their workspaces, and the run still ends with its `error` event, code `cancelled`.
A session's REPL is the exception: it outlives the run, for the session's next question.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic_ai.settings import ModelSettings

from . import prompts
from .answers import AnswerSchema, in_check_thread
from .controller import Controller, RunOutcome
from .events import (
    ChildEvent,
    ErrorCode,
    ErrorEvent,
    EventBase,
    FinalEvent,
    InputInfo,
    ParentRef,
    RunLimits,
    RunUsage,
    StartEvent,
    valid_unicode_json,
)
from .inputs import RunInput
from .llm import SubcallSession
from .repl.base import Repl, ReplOptions
from .repl.workspace import Workspace
from .runs import LiveRun
from .sessions import Session, Turn
from .store import off_loop
from .tree import RunTree

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("rlm_service")

Emit = Callable[[EventBase], None]
RUN_TIMEOUT_GRACE_S = 5.0
"""Past RLM_RUN_TIMEOUT_S runs stop at their next turn; this much later the tree is cancelled outright."""
BEGIN_TIMEOUT_S = 10.0
"""How long a session's REPL may take to list its variables for a follow-up."""
START_WAIT_S = 60.0
"""How long a run that asked for a session waits, at its end, for its REPL to finish starting."""


@dataclass
class RunPlan:
    """What one root run is asked to do."""

    prompt: str
    run_input: RunInput
    limits: RunLimits
    keep_input: bool = False
    session: Session | None = None
    """The session whose REPL this run continues (a follow-up)."""
    new_session_id: str | None = None
    """Keep this run's REPL as a new session under this id (`settings.session`)."""
    answer_check: AnswerSchema | None = None
    """The JSON Schema the answer must satisfy (`settings.answer_schema`)."""
    model_settings: ModelSettings | None = None
    """Sent with every request of the run's root model (temperature, top_p, max_tokens, seed…)."""


class _Node:
    """A run's controller once it exists, so a failure can still report the answer it had started."""

    controller: Controller | None = None

    def answer(self) -> str | None:
        return self.controller.answer[0] if self.controller and self.controller.answer[0] else None


@dataclass
class _Setup:
    """A fresh run's workspace (being made in a thread) and REPL, each once it has been started."""

    making: asyncio.Future[Workspace] | None = None
    repl: Repl | None = None
    kept: bool = False
    """Both went to a new session, which closes them."""

    async def close(self) -> None:
        """Close the REPL and remove the workspace, waiting for a thread still making it. The removal runs in
        a thread too: a run may leave up to 100,000 files (the disk watch's limit), which take about a second to
        delete."""
        if self.repl is not None:
            await self.repl.close()
        if self.making is not None:
            (made,) = await asyncio.gather(self.making, return_exceptions=True)
            if isinstance(made, Workspace):
                await asyncio.to_thread(made.remove)


class _Spent(Exception):
    """The run tree's time or cost ran out before the run had any answer: its terminal event is an error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _spent(tree: RunTree, limits: RunLimits) -> tuple[ErrorCode, str] | None:
    """Which limit of the tree ended the run, when it was time or cost (the iteration limit ends a run with
    `final`, its best answer so far, even an empty one)."""
    if tree.stop_reason == "cost":
        return "budget", (
            f"The run's cost budget (RLM_MAX_COST_USD, {limits.max_cost_usd:g} USD) was spent before it had an answer."
        )
    if tree.stop_reason == "time":
        return "timeout", (
            f"The run's time (RLM_RUN_TIMEOUT_S, {limits.run_timeout_s:g} s) ran out before it had an answer."
        )
    return None


async def _started(starting: asyncio.Future[Repl]) -> bool:
    """Whether the REPL started, waiting for a start still under way (a run can end before its first cell;
    its session still gets the REPL)."""
    if not starting.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(starting), START_WAIT_S)
    return starting.done() and not starting.cancelled() and starting.exception() is None


def _nothing() -> None:
    pass


async def _close(setup: _Setup, preparing: asyncio.Future[Repl] | None) -> None:
    """Stop a run's REPL start if it is still going, then close what it made."""
    if preparing is not None:
        preparing.cancel()
        await asyncio.gather(preparing, return_exceptions=True)
    await setup.close()


async def _to_its_end(work: Coroutine[Any, Any, None]) -> None:
    """Await `work` to its end, in a task of its own: a cancellation of the caller meanwhile does not cut it short,
    and is raised once it is done."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
        else:
            break
    if cancelled:
        raise asyncio.CancelledError()


class StartLine:
    """New root runs take their first steps one at a time, in the order they came: from the run's start to its
    first model request (the task's message, the controller, the agent's run). Served as they come, a burst of
    runs goes breadth-first: each run takes one step before any takes its next, so every first request leaves
    at the end of the burst's start-up work, every reply comes back at once, and the runs go on in lockstep,
    each step of each waiting for the same step of all (B11 in BENCHMARKS.md). In line, the first requests
    leave one after another and the replies come back spread out. The workspace and worker of a run, which its
    first cell needs only a model reply later, are made once the runs in line with it have sent their requests.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # fair: waiters acquire it in the order they began to wait

    async def enter(self) -> Callable[[], None]:
        """Wait for the run's turn; returns how to leave the line (at the first model request, or the run's
        end, whichever comes first: calls after the first do nothing)."""
        await self._lock.acquire()
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self._lock.release()

        return leave

    async def passed(self) -> None:
        """Until every run in line now has left it."""
        async with self._lock:
            pass


class RunDriver:
    """Drives the runs of one engine (which holds the shared clients, agents, REPL backend and sessions)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.line = StartLine()

    async def drive(self, run: LiveRun, plan: RunPlan, emit: Emit) -> None:
        """The root run, then exactly one `final` or `error`, and the run's log line."""
        started = time.monotonic()
        tree = RunTree(run.id, plan.limits, self.engine.subcall_budget(plan.limits), prices=self.settings.rlm_prices)
        node = _Node()
        outcome = "error"
        terminal: EventBase
        try:
            timeout = plan.limits.run_timeout_s
            async with asyncio.timeout(timeout + RUN_TIMEOUT_GRACE_S if timeout else None):
                result = await self._root(node, tree, run.id, plan, emit)
            outcome = "final" if result.ready else "final (not ready)"
            recursive = tree.limits.max_depth > 1
            spent = _spent(tree, plan.limits) if not result.ready and not result.answer else None
            if spent is not None:  # a limit of the tree ended it before it had any answer to give
                code, message = spent
                outcome = f"error:{code}"
                raise _Spent(code, message)
            check = plan.answer_check
            answer_json = await in_check_thread(check.value, result.answer) if check is not None else None
            answer_json = valid_unicode_json(answer_json)  # the answer's `\ud800` escapes are text until parsed
            terminal = FinalEvent(
                run_id=run.id,
                answer=result.answer,
                ready=result.ready,
                iterations=result.iterations,
                usage=tree.totals(),
                elapsed_ms=int((time.monotonic() - started) * 1000),
                by_depth=tree.by_depth() if recursive else None,
                cost_usd=round(tree.cost_usd, 6) if tree.cost_known else None,
                note=result.note,
                answer_json=answer_json,
            )
        except _Spent as spent:
            terminal = ErrorEvent(run_id=run.id, code=spent.code, message=str(spent), answer=None)
        except asyncio.CancelledError:
            # Cancelled by a client (or the server shutting down): the run still ends with its terminal event.
            outcome = "cancelled"
            reason = run.cancel_reason or "the server is shutting down"
            terminal = ErrorEvent(
                run_id=run.id, code="cancelled", message=f"The run was cancelled: {reason}.", answer=node.answer()
            )
        except Exception as exc:
            code, message = self.engine.classify(exc)
            if isinstance(exc, TimeoutError) and plan.limits.run_timeout_s:
                message = f"The run took longer than RLM_RUN_TIMEOUT_S ({plan.limits.run_timeout_s:g} s)."
            outcome = f"error:{code}"
            if code == "internal":
                log.exception("run %s failed", run.id)
            terminal = ErrorEvent(run_id=run.id, code=code, message=message, answer=node.answer())
        finally:
            totals = tree.totals()
            log.info(
                "run %s: %s, %d iterations, %d sub-calls (%d failed), tokens root %d/%d sub %d/%d, %.1f s",
                run.id,
                outcome,
                tree.iterations,
                tree.subcalls.used,
                tree.subcalls.failed,
                totals.root.input_tokens,
                totals.root.output_tokens,
                totals.sub.input_tokens,
                totals.sub.output_tokens,
                time.monotonic() - started,
            )
        session = plan.session or self.engine.sessions.get(plan.new_session_id or "")
        if session is not None:  # before the terminal event, so a follow-up sent on seeing it finds the session free
            answer = terminal.answer if isinstance(terminal, FinalEvent) else (node.answer() or "")
            self.engine.sessions.release(
                session, Turn.of(run.id, plan.prompt, answer or "", isinstance(terminal, FinalEvent) and terminal.ready)
            )
        emit(terminal)

    async def _root(self, node: _Node, tree: RunTree, run_id: str, plan: RunPlan, emit: Emit) -> RunOutcome:
        session = plan.session
        if session is None:
            return await self._fresh(node, tree, 0, run_id, plan, emit, emit)
        emit(self._start_event(run_id, 0, plan.run_input, plan.limits, session.id))
        began = await session.repl.begin_run(BEGIN_TIMEOUT_S)
        message = prompts.follow_up_message(
            plan.prompt,
            earlier=[(turn.prompt, turn.answer, turn.ready, turn.answer_chars) for turn in session.shown_turns()],
            not_shown=len(session.turns) - len(session.shown_turns()),
            variables=began.variables,
            chars=session.input_chars,
            lines=session.input_lines,
            kind=session.input_kind,
            preview=session.preview,
            restarted=began.restarted,
        )
        if began.restarted:
            log.info("session %s: the REPL was restarted since the last run (%s)", session.id, began.restarted)
        return await self._control(node, tree, 0, run_id, plan, session.repl, message, emit, emit)

    async def _fresh(
        self, node: _Node, tree: RunTree, depth: int, run_id: str, plan: RunPlan, emit: Emit, stream: Emit
    ) -> RunOutcome:
        """A run with a workspace and REPL of its own (closed at its end, unless kept as a session). They are
        made alongside the first model request, which needs neither: a root run goes through the start line
        (`StartLine`) to its first request, and its workspace (a uid, directories, the input) and worker
        follow while the model answers."""
        settings = self.settings
        run_input = plan.run_input
        setup = _Setup()
        preparing: asyncio.Future[Repl] | None = None
        leave_line = _nothing  # children start from a cell of their parent, already past the line
        try:
            emit(self._start_event(run_id, depth, run_input, plan.limits, plan.new_session_id))
            if depth == 0:
                leave_line = await self.line.enter()
            preparing = asyncio.ensure_future(self._prepare(setup, run_id, plan, after_line=depth == 0))
            preview = run_input.head[: settings.rlm_context_preview_chars]
            kind = prompts.describe_kind(run_input.head)
            message = prompts.task_message(
                plan.prompt, chars=run_input.chars, lines=run_input.lines, kind=kind, preview=preview
            )
            try:
                return await self._control(
                    node, tree, depth, run_id, plan, preparing, message, emit, stream, first_request=leave_line
                )
            finally:
                leave_line()  # before waiting for the REPL, whose start waits for the line
                if plan.new_session_id:
                    session_id, starting = plan.new_session_id, preparing

                    async def keep() -> None:
                        if await _started(starting):
                            assert setup.making is not None
                            self.engine.sessions.add(
                                Session(
                                    id=session_id,
                                    repl=starting.result(),
                                    workspace=setup.making.result(),
                                    input_chars=run_input.chars,
                                    input_lines=run_input.lines,
                                    input_kind=kind,
                                    preview=preview,
                                    live_run=run_id,
                                )
                            )
                            setup.kept = True

                    # to its end even if the run is cancelled meanwhile (then raised): the run ends `cancelled`
                    # and its session is kept, as for a cancel that comes earlier
                    await _to_its_end(keep())
        finally:
            leave_line()
            try:
                if not setup.kept:
                    if plan.new_session_id and depth == 0:
                        self.engine.sessions.unreserve(plan.new_session_id)
                    # To its end even if the run is cancelled meanwhile (its client leaves or stops it, the server
                    # stops, a parent's cell is cancelled, just as the run ends): cut short at its first wait, it
                    # left the worker running, the run's files (its input) on disk and its uid taken.
                    await _to_its_end(_close(setup, preparing))
            finally:
                run_input.discard()

    async def _prepare(self, setup: _Setup, run_id: str, plan: RunPlan, *, after_line: bool) -> Repl:
        """The run's workspace with its input (made in a thread: taking a worker uid reads /proc), then its
        REPL, started; both go in `setup` at once, for the run to close (a cancelled run still waits for the
        thread, which cannot be stopped, and removes what it made). `after_line`: once the runs in the start
        line have sent their first model requests (this run's among them)."""
        if after_line:
            await self.line.passed()
        setup.making = asyncio.get_running_loop().run_in_executor(None, self._workspace, plan)
        workspace = await asyncio.shield(setup.making)
        store = self.engine.store
        if plan.keep_input and store is not None:
            # in the store's threads (`off_loop`): a database that does not answer holds one of them, not one of
            # the default threads that every run's workspace needs
            await off_loop(store.keep_input, run_id, workspace.input_path)
        setup.repl = self.engine.repls.make(workspace, self._repl_options(plan))
        await setup.repl.start()
        return setup.repl

    def _workspace(self, plan: RunPlan) -> Workspace:
        """A new workspace holding the run's input."""
        run_input = plan.run_input
        workspace = Workspace.create(isolate_uid=self.engine.repls.isolates_uid)
        try:
            if run_input.path is not None:
                workspace.adopt_input(run_input.path)
            else:
                workspace.write_input(run_input.text or "")
        except BaseException:
            workspace.remove()
            raise
        return workspace

    async def _control(
        self,
        node: _Node,
        tree: RunTree,
        depth: int,
        run_id: str,
        plan: RunPlan,
        repl: Repl | asyncio.Future[Repl],
        message: str,
        emit: Emit,
        stream: Emit,
        *,
        first_request: Callable[[], None] | None = None,
    ) -> RunOutcome:
        settings = self.settings
        if plan.answer_check is not None:
            message += prompts.answer_schema_note(plan.answer_check.text())
        usage = tree.register(depth)
        subcalls = SubcallSession(
            self.engine.sub_client,
            settings.sub_model or "",
            budget=tree.subcalls,
            usage=usage.sub,
            on_cost=tree.sub_cost,
        )
        agent = self.engine.root_agent() if depth == 0 else self.engine.child_agent()
        controller = Controller(
            run_id=run_id,
            agent=agent,
            protocol=settings.rlm_root_protocol,
            limits=plan.limits,
            repl=repl,
            subcalls=subcalls,
            emit=emit,
            usage=usage,
            tree=tree,
            depth=depth,
            stream=stream,
            children=self.children,
            answer_check=plan.answer_check,
            model_settings=plan.model_settings,
            first_request=first_request,
            network=settings.rlm_worker_network == "on" or not self.engine.repls.keeps_off_network,
        )
        node.controller = controller
        return await controller.run(message)

    def _repl_options(self, plan: RunPlan) -> ReplOptions:
        settings, limits = self.settings, plan.limits
        cpu_seconds = int(limits.exec_timeout_s * limits.max_iterations) + 60
        return ReplOptions(
            max_output_chars=limits.max_output_chars,
            memory_mb=settings.rlm_worker_memory_mb,
            network=settings.rlm_worker_network == "on",
            # a session's worker serves several runs: CPU time is counted over its whole life
            cpu_seconds=cpu_seconds * (8 if plan.new_session_id else 1),
            processes=settings.rlm_worker_processes,
            disk_mb=settings.rlm_worker_disk_mb,
            landlock=settings.rlm_worker_landlock == "on",
        )

    def _start_event(
        self, run_id: str, depth: int, run_input: RunInput, limits: RunLimits, session_id: str | None
    ) -> StartEvent:
        settings = self.settings
        root_model = settings.root_model if depth == 0 else settings.sub_model
        return StartEvent(
            run_id=run_id,
            model=root_model or "",
            sub_model=settings.sub_model or "",
            input=InputInfo(chars=run_input.chars, lines=run_input.lines),
            limits=limits,
            protocol=settings.rlm_root_protocol,
            repl=settings.rlm_repl,
            session_id=session_id,
        )

    async def children(self, parent: Controller, prompts_: list[str], contexts: list[str | None]) -> list[str]:
        """`rlm_batch` of a run the tree lets recurse: one child run per prompt, concurrently."""
        tree, depth = parent.tree, parent.depth + 1
        reference = ParentRef(run_id=parent.run_id, iteration=parent.iteration)
        hold = parent.subcalls.replies.batch()  # held until every child has answered, as llm_batch's replies

        async def child(prompt: str, context: str | None) -> str:
            async with tree.children_at(depth):
                run_id = uuid.uuid4().hex[:16]
                started = time.monotonic()

                def emit(event: EventBase) -> None:
                    parent.stream(
                        ChildEvent(
                            run_id=tree.root_run_id,
                            depth=depth,
                            parent=reference,
                            event=event.type,
                            data=event.model_dump(mode="json", exclude={"seq"}),
                        )
                    )

                node = _Node()
                plan = RunPlan(prompt, RunInput.from_text(context or ""), parent.limits)
                try:
                    result = await self._fresh(node, tree, depth, run_id, plan, emit, parent.stream)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    code, message = self.engine.classify(exc)
                    emit(ErrorEvent(run_id=run_id, code=code, message=message, answer=node.answer()))
                    return f"Error: the child run failed ({code}): {message}"
                own = node.controller.usage if node.controller else RunUsage()
                emit(
                    FinalEvent(
                        run_id=run_id,
                        answer=result.answer,
                        ready=result.ready,
                        iterations=result.iterations,
                        usage=own,
                        elapsed_ms=int((time.monotonic() - started) * 1000),
                        note=result.note,
                    )
                )
                if result.answer:
                    return hold.keep(result.answer)[0]
                return "Error: the child run ended without an answer" + (f": {result.note}" if result.note else ".")

        with hold:
            return list(await asyncio.gather(*(child(p, c) for p, c in zip(prompts_, contexts, strict=True))))
