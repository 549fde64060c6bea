"""The engine's public face: `async for event in engine.run(prompt, input)`.

An `Engine` holds what runs share (settings, one HTTP connection pool, the root model, the sub-LLM
client). Each call of `run` sets up a private workspace and REPL, drives a `Controller`, and yields
the contract's events; the last one is always exactly one `final` or `error`.

What cancels what: closing the `run` generator (or cancelling the task iterating it) cancels the
run's driver task. That cancels the root model request or the cell in flight; the cell's pending
sub-calls are cancelled with it; and the driver's `finally` kills the worker's process group and
removes the workspace. Nothing of a run outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import Agent
from pydantic_ai import exceptions as ai_exceptions
from pydantic_ai.models import Model

from . import prompts
from .config import Settings
from .controller import Controller, RunOutcome, build_agent
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
)
from .inputs import RunInput
from .llm import ChatClient, ModelCallError, SubcallBudget, SubcallSession
from .repl.base import Repl, ReplError, ReplOptions
from .repl.inprocess_repl import InprocessRepl
from .repl.spawner import SpawnError, Zygote
from .repl.subprocess_repl import SubprocessRepl
from .repl.workspace import Workspace, instance_directory
from .rootmodel import build_root_model
from .runs import LiveRun, RunRegistry
from .security import redact
from .store import RunRecord, RunStore
from .tree import RunTree

log = logging.getLogger("rlm_service")
RUN_TIMEOUT_GRACE_S = 5.0
"""Past RLM_RUN_TIMEOUT_S runs stop at their next turn; this much later the tree is cancelled outright."""


class _Node:
    """A run's controller once it exists, so a failure can still report the answer it had started."""

    controller: Controller | None = None

    def answer(self) -> str | None:
        return self.controller.answer[0] if self.controller and self.controller.answer[0] else None


class RunSettings(BaseModel):
    """Per-run settings a request may pass: each may only lower the server's configured value."""

    model_config = ConfigDict(extra="forbid")

    # strict: `true` or "3" is a mistake in the request, not 1 or 3
    max_iterations: int | None = Field(None, ge=1, strict=True)
    max_subcalls: int | None = Field(None, ge=1, strict=True)
    exec_timeout_s: float | None = Field(None, ge=1, strict=True)
    keep_input: bool = Field(False, strict=True,
                             description="Keep the input in the run history (it is not, by default).")
    detach: bool = Field(False, strict=True,
                         description="Closing the connection does not cancel the run: it goes on within its limits "
                                     "and can be re-attached (GET /api/runs/{id}/events) or cancelled.")


class SettingsRefused(ValueError):
    """A per-run setting above the server's limit."""


def effective_limits(settings: Settings, requested: RunSettings | None) -> RunLimits:
    requested = requested or RunSettings()
    limits = RunLimits(max_iterations=settings.rlm_max_iterations, max_subcalls=settings.rlm_max_subcalls,
                       exec_timeout_s=settings.rlm_exec_timeout_s, max_output_chars=settings.rlm_max_output_chars,
                       subcall_concurrency=settings.rlm_subcall_concurrency, max_depth=settings.rlm_max_depth,
                       run_timeout_s=settings.rlm_run_timeout_s, max_cost_usd=settings.rlm_max_cost_usd)
    for name, env in (("max_iterations", "RLM_MAX_ITERATIONS"), ("max_subcalls", "RLM_MAX_SUBCALLS"),
                      ("exec_timeout_s", "RLM_EXEC_TIMEOUT_S")):
        value = getattr(requested, name)
        if value is None:
            continue
        ceiling = getattr(limits, name)
        if value > ceiling:
            raise SettingsRefused(f"settings.{name} may not exceed the server's {env} ({ceiling:g})")
        setattr(limits, name, value)
    return limits


def classify_error(exc: BaseException) -> tuple[ErrorCode, str]:
    """Map a failure to the contract's error code and a message for the user."""
    if isinstance(exc, ai_exceptions.UsageLimitExceeded):
        return "budget", f"The run hit a usage limit: {exc}"
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if isinstance(exc, ai_exceptions.ModelAuthenticationError) or status in (401, 403):
        return "auth", f"The model server refused the API key: {exc}. Check OPENAI_API_KEY."
    if isinstance(exc, ModelCallError):
        return ("auth" if exc.kind == "auth" else "model_unavailable"), str(exc)
    if isinstance(exc, (ai_exceptions.ModelAPIError, ai_exceptions.UnexpectedModelBehavior)):
        return "model_unavailable", f"The root model failed: {exc}"
    if isinstance(exc, ReplError):
        return "internal", f"The REPL failed: {exc}"
    if isinstance(exc, TimeoutError):
        return "timeout", "The run took too long."
    return "internal", f"Internal error: {type(exc).__name__}: {exc}"


def _input_info(run_input: RunInput) -> InputInfo:
    return InputInfo(chars=run_input.chars, lines=run_input.lines)


class Engine:
    """Runs RLM tasks. Use as `async with Engine(settings) as engine:`, then `engine.run(...)`."""

    def __init__(self, settings: Settings, *, root_model: Model | Callable[[], Model] | None = None,
                 store: RunStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sub_client = ChatClient(settings.openai_api_base, settings.api_key_value(),
                                     timeout=settings.rlm_subcall_timeout_s, retries=settings.rlm_model_retries,
                                     proxy=settings.proxy_for_endpoint())
        self.root_client = self.sub_client.with_timeout(settings.rlm_root_timeout_s)  # one connection pool
        self.zygote = Zygote(settings.rlm_worker_preload)
        self._root_model = root_model
        self._agent: Agent[Controller, str] | None = None
        self._child_agent: Agent[Controller, str] | None = None
        self.runs = RunRegistry()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def start(self) -> None:
        """Warm up what the first run would otherwise wait for: the worker zygote. Before that, take this
        process's directory for run files, removing those that dead server processes left behind."""
        await asyncio.to_thread(instance_directory)
        if self.settings.rlm_repl == "subprocess":
            try:
                await self.zygote.start()
            except SpawnError as exc:  # runs will try again, and fail with a clear error if it persists
                log.warning("the REPL worker zygote did not start: %s", exc)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.zygote.close()
        await self.sub_client.aclose()  # the root client's pool too: they share it

    def child_agent(self) -> Agent[Controller, str]:
        """The agent of child runs: the sub model as their root (shared, like the root's)."""
        if self._child_agent is None:
            model = build_root_model(self.settings, self.root_client, model_name=self.settings.sub_model)
            self._child_agent = build_agent(model, self.settings.rlm_root_protocol)
        return self._child_agent

    def root_agent(self) -> Agent[Controller, str]:
        """The root agent for the next run: shared across runs unless a model factory was given."""
        protocol = self.settings.rlm_root_protocol
        if callable(self._root_model) and not isinstance(self._root_model, Model):
            return build_agent(self._root_model(), protocol)
        if self._agent is None:
            model = self._root_model if isinstance(self._root_model, Model) else build_root_model(
                self.settings, self.root_client)
            self._agent = build_agent(model, protocol)
        return self._agent

    def launch(self, prompt: str, run_input: RunInput, settings: RunSettings | None = None, *,
               run_id: str | None = None) -> LiveRun:
        """Start a run on the event loop and return it; it goes on whoever follows it, until it ends.

        The run ends with exactly one `final` or `error` event; `LiveRun.cancel` ends it with `error`
        `cancelled`. Refuses (`SettingsRefused`) per-run settings above the server's limits.
        """
        limits = effective_limits(self.settings, settings)
        run = LiveRun(run_id or uuid.uuid4().hex[:16], detached=bool(settings and settings.detach))
        store = self.store

        def emit(event: EventBase) -> None:
            run.emit(event)  # type: ignore[arg-type]
            if store is not None:
                store.record(run.id, event)

        if store is not None:
            store.begin(RunRecord(
                id=run.id, created=time.time(), status="running", prompt=prompt,
                settings=(settings or RunSettings()).model_dump(exclude_none=True), input_chars=run_input.chars,
                input_lines=run_input.lines, input_bytes=run_input.size_bytes, input_sha256=run_input.sha256,
                input_name=run_input.name))
        keep_input = bool(settings and settings.keep_input and store is not None)
        run.task = asyncio.create_task(self._drive(run, prompt, run_input, limits, emit, keep_input),
                                       name=f"rlm-run-{run.id}")
        self.runs.add(run)
        return run

    async def run(self, prompt: str, input_data: str | RunInput = "", settings: RunSettings | None = None,
                  *, run_id: str | None = None) -> AsyncGenerator[EventBase, None]:
        """Run one task; yields its events, ending with exactly one `final` or `error`. Closing the
        generator early cancels the run (unless it was started with `settings.detach`)."""
        run_input = input_data if isinstance(input_data, RunInput) else RunInput.from_text(input_data)
        run = self.launch(prompt, run_input, settings, run_id=run_id)
        try:
            async for event in run.follow():
                yield event
        finally:
            if not run.detached:
                run.cancel("the client stopped reading")
                await run.wait()

    def _make_repl(self, workspace: Workspace, controller: Controller, limits: RunLimits) -> Repl:
        options = ReplOptions(
            max_output_chars=limits.max_output_chars, memory_mb=self.settings.rlm_worker_memory_mb,
            network=self.settings.rlm_worker_network == "on",
            cpu_seconds=int(limits.exec_timeout_s * limits.max_iterations) + 60,
            processes=self.settings.rlm_worker_processes, disk_mb=self.settings.rlm_worker_disk_mb,
            landlock=self.settings.rlm_worker_landlock == "on",
        )
        if self.settings.rlm_repl == "inprocess":
            return InprocessRepl(workspace, controller.serve_batch, options, rlm=controller.serve_rlm)
        return SubprocessRepl(workspace, controller.serve_batch, options, self.zygote, rlm=controller.serve_rlm)

    def _tree(self, run_id: str, limits: RunLimits) -> RunTree:
        settings = self.settings
        return RunTree(run_id, limits, SubcallBudget(limits.max_subcalls, limits.subcall_concurrency),
                       prices=settings.rlm_prices)

    async def _drive(self, run: LiveRun, prompt: str, run_input: RunInput, limits: RunLimits,
                     emit: Callable[[EventBase], None], keep_input: bool = False) -> None:
        """The root run: its node, then exactly one `final` or `error`, and the run's log line."""
        started = time.monotonic()
        tree = self._tree(run.id, limits)
        node = _Node()
        outcome = "error"
        try:
            timeout = self.settings.rlm_run_timeout_s
            async with asyncio.timeout(timeout + RUN_TIMEOUT_GRACE_S if timeout else None):
                result = await self._run_node(node, tree, 0, run.id, prompt, run_input, limits, emit, emit,
                                              keep_input=keep_input)
            outcome = "final" if result.ready else "final (not ready)"
            totals = tree.totals()
            recursive = tree.limits.max_depth > 1
            emit(FinalEvent(run_id=run.id, answer=result.answer, ready=result.ready, iterations=result.iterations,
                            usage=totals, elapsed_ms=int((time.monotonic() - started) * 1000),
                            by_depth=tree.by_depth() if recursive else None,
                            cost_usd=round(tree.cost_usd, 6) if tree.cost_known else None, note=result.note))
        except asyncio.CancelledError:
            # Cancelled by a client (or the server shutting down): the run still ends with its terminal event.
            outcome = "cancelled"
            reason = run.cancel_reason or "the server is shutting down"
            emit(ErrorEvent(run_id=run.id, code="cancelled", message=f"The run was cancelled: {reason}.",
                            answer=node.answer()))
        except Exception as exc:
            code, message = classify_error(exc)
            if isinstance(exc, TimeoutError) and self.settings.rlm_run_timeout_s:
                message = f"The run took longer than RLM_RUN_TIMEOUT_S ({self.settings.rlm_run_timeout_s:g} s)."
            outcome = f"error:{code}"
            if code == "internal":
                log.exception("run %s failed", run.id)
            emit(ErrorEvent(run_id=run.id, code=code, message=self._redact(message), answer=node.answer()))
        finally:
            totals = tree.totals()
            log.info("run %s: %s, %d iterations, %d sub-calls (%d failed), tokens root %d/%d sub %d/%d, %.1f s",
                     run.id, outcome, tree.iterations, tree.subcalls.used, tree.subcalls.failed,
                     totals.root.input_tokens, totals.root.output_tokens, totals.sub.input_tokens,
                     totals.sub.output_tokens, time.monotonic() - started)

    async def _run_node(self, node: _Node, tree: RunTree, depth: int, run_id: str, prompt: str,
                        run_input: RunInput, limits: RunLimits, emit: Callable[[EventBase], None],
                        stream: Callable[[EventBase], None], *, keep_input: bool = False) -> RunOutcome:
        """One run of a tree, root or child: its workspace, REPL and controller, from start to outcome."""
        settings = self.settings
        workspace = Workspace.create(isolate_uid=settings.rlm_repl == "subprocess")
        try:
            if run_input.path is not None:
                workspace.adopt_input(run_input.path)
            else:
                await asyncio.to_thread(workspace.write_input, run_input.text or "")
            if keep_input and self.store is not None:
                await asyncio.to_thread(self.store.keep_input, run_id, workspace.input_path)
            root_model = settings.root_model if depth == 0 else settings.sub_model
            emit(StartEvent(
                run_id=run_id, model=root_model or "", sub_model=settings.sub_model or "",
                input=_input_info(run_input),
                limits=limits,
                protocol=settings.rlm_root_protocol, repl=settings.rlm_repl,
            ))
            usage = tree.register(depth)
            subcalls = SubcallSession(self.sub_client, settings.sub_model or "", budget=tree.subcalls,
                                      usage=usage.sub, on_cost=tree.sub_cost)
            agent = self.root_agent() if depth == 0 else self.child_agent()
            controller = Controller(run_id=run_id, agent=agent, protocol=settings.rlm_root_protocol, limits=limits,
                                    repl=None, subcalls=subcalls, emit=emit, usage=usage,  # type: ignore[arg-type]
                                    tree=tree, depth=depth, stream=stream, children=self._run_children)
            node.controller = controller
            repl = self._make_repl(workspace, controller, limits)
            controller.repl = repl
            try:
                preview = run_input.head[: settings.rlm_context_preview_chars]
                message = prompts.task_message(prompt, chars=run_input.chars, lines=run_input.lines,
                                               kind=prompts.describe_kind(run_input.head), preview=preview)
                return await controller.run(message)
            finally:
                await repl.close()
        finally:
            workspace.remove()
            run_input.discard()

    async def _run_children(self, parent: Controller, prompts_: list[str], contexts: list[str | None]) -> list[str]:
        """`rlm_batch` of a run the tree lets recurse: one child run per prompt, concurrently."""
        tree, depth = parent.tree, parent.depth + 1
        reference = ParentRef(run_id=parent.run_id, iteration=parent.iteration)

        async def child(prompt: str, context: str | None) -> str:
            async with tree.children:
                run_id = uuid.uuid4().hex[:16]
                started = time.monotonic()

                def emit(event: EventBase) -> None:
                    parent.stream(ChildEvent(run_id=tree.root_run_id, depth=depth, parent=reference,
                                             event=str(getattr(event, "type", "")),
                                             data=event.model_dump(mode="json")))

                node = _Node()
                try:
                    result = await self._run_node(node, tree, depth, run_id, prompt, RunInput.from_text(context or ""),
                                                  parent.limits, emit, parent.stream)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    code, message = classify_error(exc)
                    emit(ErrorEvent(run_id=run_id, code=code, message=self._redact(message), answer=node.answer()))
                    return f"Error: the child run failed ({code}): {self._redact(message)}"
                own = node.controller.usage if node.controller else RunUsage()
                emit(FinalEvent(run_id=run_id, answer=result.answer, ready=result.ready,
                                iterations=result.iterations, usage=own,
                                elapsed_ms=int((time.monotonic() - started) * 1000)))
                if result.answer:
                    return result.answer
                return "Error: the child run ended without an answer."

        return list(await asyncio.gather(*(child(p, c) for p, c in zip(prompts_, contexts, strict=True))))

    def _redact(self, text: str) -> str:
        return redact(text, self.settings.api_key_value())


def run_blocking(settings: Settings, prompt: str, input_data: str = "", run_settings: RunSettings | None = None,
                 *, on_event: Callable[[EventBase], Any] | None = None, **engine_kwargs: Any) -> EventBase:
    """Run one task to the end from synchronous code; returns the terminal event."""

    async def main() -> EventBase:
        async with Engine(settings, **engine_kwargs) as engine:
            last: EventBase | None = None
            async for event in engine.run(prompt, input_data, run_settings):
                if on_event:
                    on_event(event)
                last = event
            assert last is not None
            return last

    return asyncio.run(main())
