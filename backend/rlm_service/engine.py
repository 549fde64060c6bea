"""The engine's public face: `engine.launch(...)` starts a run, `async for event in engine.run(...)` follows one.

An `Engine` holds what runs share: the settings, one HTTP connection pool for the root model and the
sub-calls, the agents, the REPL backend (`RLM_REPL`), the live runs and the sessions. A run's own work,
from its workspace to its terminal event, is `runner.RunDriver`'s (its docstring says what cancels what).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_ai import Agent
from pydantic_ai import exceptions as ai_exceptions
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings

from .answers import AnswerSchema, check_schema, too_long
from .capacity import Capacity, LocalCapacity
from .config import Settings
from .controller import Controller, build_agent
from .events import ErrorCode, EventBase, RunLimits, valid_unicode, valid_unicode_json
from .inputs import RunInput
from .llm import ChatClient, ModelCallError, SubcallBudget
from .repl.base import ReplError, backend
from .repl.workspace import hold_instance_directory, release_instance_directory
from .rootmodel import build_root_model
from .runner import RunDriver, RunPlan
from .runs import LiveRun, RunRegistry
from .security import redact
from .sessions import SessionManager, SessionUnavailable
from .store import RunRecord, RunStore

log = logging.getLogger("rlm_service")
SHUTTING_DOWN = "the server is shutting down"
"""Why the runs still live when the server stops are cancelled."""


SCHEMA_CHECKED = "schema_checked"
"""Validation context of settings whose answer schema was checked already (`RunSettings.model_validate(…,
context={SCHEMA_CHECKED: True})`): the check takes a process and up to seconds."""
SCHEMA_MAX_CHARS = "schema_max_chars"
"""Validation context: the server's RLM_MAX_PROMPT_CHARS, which a schema longer than is refused before its check
starts a process (`{SCHEMA_MAX_CHARS: settings.rlm_max_prompt_chars}`; `effective_limits` refuses it too)."""


class RunSettings(BaseModel):
    """Per-run settings a request may pass: each may only lower the server's configured value."""

    model_config = ConfigDict(extra="forbid")

    # strict: `true` or "3" is a mistake in the request, not 1 or 3
    max_iterations: int | None = Field(None, ge=1, strict=True)
    max_subcalls: int | None = Field(None, ge=1, strict=True)
    exec_timeout_s: float | None = Field(None, ge=1, strict=True)
    keep_input: bool = Field(
        False, strict=True, description="Keep the input in the run history (it is not, by default)."
    )
    detach: bool = Field(
        False,
        strict=True,
        description="Closing the connection does not cancel the run: it goes on within its limits "
        "and can be re-attached (GET /api/runs/{id}/events) or cancelled.",
    )
    session: bool = Field(
        False,
        strict=True,
        description="Keep the run's REPL after the run: `start` carries a `session_id` for "
        "follow-up questions on the same variables.",
    )
    answer_schema: dict[str, Any] | None = Field(
        None,
        description="A JSON Schema the answer must satisfy: the answer is accepted as ready only when it is "
        "JSON valid against it, and `final.answer_json` carries the parsed value.",
    )

    @field_validator("answer_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return None
        context = info.context or {}
        if not context.get(SCHEMA_CHECKED):  # (a process of ours checked it, and sends it on)
            check_schema(value, context.get(SCHEMA_MAX_CHARS))  # raises SchemaInvalid, a ValueError: 422, its reason
        # a lone surrogate in it (a JSON "\ud800") would fail every listing of the history that shows the run
        return valid_unicode_json(value)  # type: ignore[no-any-return]

    def answer_check(self) -> AnswerSchema | None:
        """The check of the run's answers (the schema was checked when these settings were made)."""
        return AnswerSchema(self.answer_schema) if self.answer_schema is not None else None


class SettingsRefused(ValueError):
    """A per-run setting above the server's limit."""


class EngineClosed(RuntimeError):
    """A run asked of an engine that is closing or closed."""


def effective_limits(settings: Settings, requested: RunSettings | None) -> RunLimits:
    requested = requested or RunSettings()
    limits = RunLimits(
        max_iterations=settings.rlm_max_iterations,
        max_subcalls=settings.rlm_max_subcalls,
        exec_timeout_s=settings.rlm_exec_timeout_s,
        max_output_chars=settings.rlm_max_output_chars,
        subcall_concurrency=settings.rlm_subcall_concurrency,
        max_depth=settings.rlm_max_depth,
        run_timeout_s=settings.rlm_run_timeout_s,
        max_cost_usd=settings.rlm_max_cost_usd,
    )
    for name, env in (
        ("max_iterations", "RLM_MAX_ITERATIONS"),
        ("max_subcalls", "RLM_MAX_SUBCALLS"),
        ("exec_timeout_s", "RLM_EXEC_TIMEOUT_S"),
    ):
        value = getattr(requested, name)
        if value is None:
            continue
        ceiling = getattr(limits, name)
        if value > ceiling:
            raise SettingsRefused(f"settings.{name} may not exceed {env} ({ceiling:g})")
        setattr(limits, name, value)
    schema = requested.answer_schema
    if schema is not None and (reason := too_long(schema, settings.rlm_max_prompt_chars)) is not None:
        raise SettingsRefused(f"settings.answer_schema: {reason}")
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
    if isinstance(exc, ai_exceptions.UnexpectedModelBehavior):
        return "model_unavailable", f"The root model failed: {_misbehaviour(exc)}"
    if isinstance(exc, ai_exceptions.ModelAPIError):
        return "model_unavailable", f"The root model failed: {exc}"
    if isinstance(exc, SessionUnavailable):
        return "internal", str(exc)
    if isinstance(exc, ReplError):
        return "internal", f"The REPL failed: {exc}"
    if isinstance(exc, TimeoutError):
        return "timeout", "The run took too long."
    return "internal", f"Internal error: {type(exc).__name__}: {exc}"


_TOOL_RETRIES = re.compile(r"Tool '(.*)' exceeded max retries count of (\d+)")
_OUTPUT_RETRIES = re.compile(r"Exceeded maximum output retries \((\d+)\)")


def _misbehaviour(exc: ai_exceptions.UnexpectedModelBehavior) -> str:
    """What the root model did wrong, said for the user: PydanticAI's words for a tool call it could not run, or
    for replies with neither text nor a tool call, name its own retry setting and documentation, which the user of
    the service has no use for, and not what the model sent."""
    cause = exc.__cause__
    tool = _TOOL_RETRIES.fullmatch(exc.message.split(". Consider raising", 1)[0])
    if tool is not None:
        name, times = tool.group(1), int(tool.group(2)) + 1
        if isinstance(cause, ValidationError):
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}"
                for error in cause.errors(include_url=False)[:3]
            )
            why = f"its arguments were not JSON with one string, `code` ({problems})"
        elif "No tools available" in str(cause):
            return (
                f"it called a tool {name!r} {times} times in a row, though it is offered none with "
                "RLM_ROOT_PROTOCOL=text (its code goes in ```python blocks), and was told so each time."
            )
        else:
            why = str(cause or "it could not be run").rstrip(".")
        return (
            f"it called the tool {name!r} wrongly {times} times in a row, and was told why each time: {why}. "
            "Try a root model that calls tools reliably, or RLM_ROOT_PROTOCOL=text."
        )
    output = _OUTPUT_RETRIES.fullmatch(exc.message)
    if output is not None:
        return (
            f"its replies were empty (neither text nor code) {int(output.group(1)) + 1} times in a row, "
            "though it was asked again each time."
        )
    return str(exc)


class Engine:
    """Runs RLM tasks. Use as `async with Engine(settings) as engine:`, then `engine.run(...)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        root_model: Model | Callable[[], Model] | None = None,
        store: RunStore | None = None,
        sessions: Capacity | None = None,
    ) -> None:
        """`sessions`: RLM_MAX_SESSIONS counted over the instance's processes (one process: here)."""
        self.settings = settings
        self.store = store
        self.sub_client = ChatClient(
            settings.openai_api_base,
            settings.api_key_value(),
            timeout=settings.rlm_subcall_timeout_s,
            retries=settings.rlm_model_retries,
            proxy=settings.proxy_for_endpoint(),
        )
        self.root_client = self.sub_client.with_timeout(settings.rlm_root_timeout_s)  # one connection pool
        self.repls = backend(settings.rlm_repl, settings.rlm_worker_preload)
        self.runs = RunRegistry()
        self.sessions = SessionManager(
            idle_s=settings.rlm_session_idle_s, capacity=sessions or LocalCapacity(settings.rlm_max_sessions)
        )
        self._root_model = root_model
        self._agent: Agent[Controller, str] | None = None
        self._child_agent: Agent[Controller, str] | None = None
        self._driver = RunDriver(self)
        self._closing = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def start(self) -> None:
        """Warm up what the first run would otherwise wait for (the worker zygote). Before that, take this
        process's directory for run files, removing those that dead server processes left behind."""
        await asyncio.to_thread(hold_instance_directory)
        await self.repls.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the live runs (each ends with its `error` event), end the sessions, stop the workers. Runs asked
        for from now on are refused (`EngineClosed`): one started meanwhile would start the workers' zygote again,
        which then outlived the engine, and put its files where nothing removes them."""
        self._closing = True
        await asyncio.gather(*(run.wait() for run in self.cancel_live()))
        await self.sessions.close()
        await self.repls.close()
        await asyncio.to_thread(release_instance_directory)  # the run files, now that no run is left
        await self.sub_client.aclose()  # the root client's pool too: they share it

    def cancel_live(self) -> list[LiveRun]:
        """Cancel every live run (the server is stopping): each ends with its `error` event, code `cancelled`."""
        live = self.runs.live()
        for run in live:
            run.cancel(SHUTTING_DOWN)
        return live

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
            model = (
                self._root_model
                if isinstance(self._root_model, Model)
                else build_root_model(self.settings, self.root_client)
            )
            self._agent = build_agent(model, protocol)
        return self._agent

    def subcall_budget(self, limits: RunLimits) -> SubcallBudget:
        return SubcallBudget(limits.max_subcalls, limits.subcall_concurrency)

    def classify(self, exc: BaseException) -> tuple[ErrorCode, str]:
        """The contract's error code for a failure, and its message with the key redacted."""
        code, message = classify_error(exc)
        return code, redact(message, self.settings.api_key_value())

    def launch(
        self,
        prompt: str,
        run_input: RunInput,
        settings: RunSettings | None = None,
        *,
        run_id: str | None = None,
        session_id: str | None = None,
        model_settings: ModelSettings | None = None,
    ) -> LiveRun:
        """Start a run on the event loop and return it; it goes on whoever follows it, until it ends.

        The run ends with exactly one `final` or `error` event; `LiveRun.cancel` ends it with `error`
        `cancelled`. With `session_id` the run is a follow-up on that session's REPL (`run_input` unused).
        `model_settings` (temperature, top_p, max_tokens, seed…) go with every request of the root model.
        Raises `SettingsRefused` for per-run settings above the server's limits, and `SessionUnavailable`
        (404, 409) for a session that is gone or busy, and `EngineClosed` once `aclose` has begun.
        """
        if self._closing:
            raise EngineClosed("the engine is closing or closed: it starts no new run")
        limits = effective_limits(self.settings, settings)
        prompt = valid_unicode(prompt)  # stored, and shown to the root model, as UTF-8
        run_id = run_id or uuid.uuid4().hex[:16]
        session = self.sessions.claim(session_id, run_id) if session_id is not None else None
        new_session_id = None
        if settings and settings.session and session is None:
            self.sessions.reserve()
            new_session_id = self.sessions.new_id()
            self.sessions.announce(new_session_id, run_id, run_input.chars, run_input.lines)
        run = LiveRun(
            run_id, detached=bool(settings and settings.detach), session_id=session.id if session else new_session_id
        )
        if session is not None:
            run_input = RunInput(chars=session.input_chars, lines=session.input_lines, size_bytes=0, head="")
        store = self.store

        def emit(event: EventBase) -> None:
            run.emit(event)  # type: ignore[arg-type]
            if store is not None:
                store.record(run.id, event)

        if store is not None:
            store.begin(
                RunRecord(
                    id=run.id,
                    created=time.time(),
                    status="running",
                    prompt=prompt,
                    settings=(settings or RunSettings()).model_dump(exclude_none=True),
                    input_chars=run_input.chars,
                    input_lines=run_input.lines,
                    input_bytes=run_input.size_bytes,
                    input_sha256=run_input.sha256,
                    input_name=run_input.name,
                    session_id=run.session_id,
                )
            )
        plan = RunPlan(
            prompt,
            run_input,
            limits,
            keep_input=bool(settings and settings.keep_input and store),
            session=session,
            new_session_id=new_session_id,
            answer_check=settings.answer_check() if settings else None,
            model_settings=model_settings,
        )
        run.task = asyncio.create_task(self._driver.drive(run, plan, emit), name=f"rlm-run-{run.id}")
        self.runs.add(run)
        return run

    async def run(
        self,
        prompt: str,
        input_data: str | RunInput = "",
        settings: RunSettings | None = None,
        *,
        run_id: str | None = None,
        session_id: str | None = None,
    ) -> AsyncGenerator[EventBase, None]:
        """Run one task; yields its events, ending with exactly one `final` or `error`. Closing the
        generator early cancels the run (unless it was started with `settings.detach`)."""
        run_input = input_data if isinstance(input_data, RunInput) else RunInput.from_text(input_data)
        run = self.launch(prompt, run_input, settings, run_id=run_id, session_id=session_id)
        try:
            async for event in run.follow():
                yield event
        finally:
            if not run.detached:
                run.cancel("the client stopped reading")
                await run.wait()


def run_blocking(
    settings: Settings,
    prompt: str,
    input_data: str = "",
    run_settings: RunSettings | None = None,
    *,
    on_event: Callable[[EventBase], Any] | None = None,
    **engine_kwargs: Any,
) -> EventBase:
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
