"""The root loop: a PydanticAI agent writes code, the REPL runs it, events report every step.

One `Controller` drives one run. With the `tools` protocol the agent has a single tool, `run_python`,
whose calls run one at a time and in order; with `text` the agent has no tools and every ```repl or
```python block of its reply runs. Either way the loop walks `agent.iter` node by node, so it can
stop right after the cell that marks the answer ready, or when the iteration budget is spent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic_ai import Agent, RunContext, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage as AgentUsage
from pydantic_ai.usage import UsageLimits

from . import prompts
from .answers import in_check_thread
from .events import (
    AnswerEvent,
    CodeEvent,
    EventBase,
    FigureEvent,
    OutputEvent,
    RunLimits,
    RunUsage,
    SubcallsEvent,
    ThoughtEvent,
    UsageEvent,
)
from .llm import SubcallSession
from .repl.base import CellOutcome, Repl
from .repl.executor import as_sub_calls
from .rootmodel import REPORTED_COST
from .tree import RunTree

Emit = Callable[[EventBase], None]

# A block may be left open at the end of a reply (small models, or a reply cut at its token limit).
_FENCE = re.compile(r"```(?:repl|python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
PROGRESS_INTERVAL_S = 0.1
MAX_CELLS_PER_REPLY = 20
"""Cells one root reply may run (tool calls, or fenced blocks with the text protocol); the rest are answered "not
run". Turns are capped by RLM_MAX_ITERATIONS, but a reply of 16 MiB could hold 100,000 calls: one of 10,000 took
the server from 122 to 527 MB and made the next root request 82 MB (the attack pass)."""


def extract_code_blocks(text: str) -> tuple[list[str], str]:
    """The ```repl/```python blocks of a reply, in order, and the prose around them."""
    blocks = [match.group(1) for match in _FENCE.finditer(text)]
    prose = _FENCE.sub("", text).strip()
    return [block for block in blocks if block.strip()], prose


@dataclass
class RunOutcome:
    answer: str
    ready: bool
    iterations: int
    note: str | None = None
    """For the user, when the answer cannot be trusted: the root model never ran any code."""


class _CellProgress:
    """Throttled `subcalls` events for one cell, summed over the batches it sends: the start and the end of each
    batch that sends calls, and between them one event per PROGRESS_INTERVAL_S at most. A batch that sends none
    (every prompt refused: the budget is spent, or it has none) is throttled as a whole: a cell calling llm_query
    in a loop past the budget would otherwise add an event per call to the run, in memory and in the history.
    `flush` shows what the last events left out, when the cell ends."""

    def __init__(self, emit: Callable[[int, int, int], None]) -> None:
        self._emit = emit
        self.done = self.failed = self.total = 0
        self._last = 0.0
        self._shown = (0, 0, 0)

    def batch_reporter(self) -> Callable[[int, int, int], None]:
        base_done, base_failed, base_total = self.done, self.failed, self.total
        first = True

        def report(done: int, failed: int, total: int) -> None:
            nonlocal first
            self.done, self.failed, self.total = base_done + done, base_failed + failed, base_total + total
            now = time.monotonic()
            starts = first and done < total
            ends = not first and self.done >= self.total
            first = False
            if starts or ends or now - self._last >= PROGRESS_INTERVAL_S:
                self._last = now
                self._show()

        return report

    def flush(self) -> None:
        """The cell ended: show its totals if the last event did not."""
        if (self.done, self.failed, self.total) != self._shown:
            self._show()

    def _show(self) -> None:
        self._shown = (self.done, self.failed, self.total)
        self._emit(self.done, self.failed, self.total)


class AnswerCheck(Protocol):
    def problem(self, content: str) -> str | None:
        """What is wrong with an answer marked ready (None: it is accepted)."""


ChildRunner = Callable[["Controller", list[str], list[str | None]], Awaitable[list[str]]]
"""Runs child RLMs for a controller's `rlm_batch`: prompts and contexts in, final answers out."""


class Controller:
    """Drives one run's root model and REPL, emitting the contract's events through `emit`.

    A run is one node of a `RunTree` (depth 0 for the root): it draws its turns and sub-calls from the
    tree's budgets, keeps its own usage, and starts children through `children` when the tree allows.
    """

    def __init__(
        self,
        *,
        run_id: str,
        agent: Agent[Controller, str],
        protocol: str,
        limits: RunLimits,
        repl: Repl | asyncio.Future[Repl],
        subcalls: SubcallSession,
        emit: Emit,
        usage: RunUsage,
        tree: RunTree,
        depth: int = 0,
        stream: Emit | None = None,
        children: ChildRunner | None = None,
        answer_check: AnswerCheck | None = None,
        model_settings: ModelSettings | None = None,
        first_request: Callable[[], None] | None = None,
        network: bool = False,
    ) -> None:
        """`repl`: the REPL, or its start running alongside the first model request: the first cell waits for
        it, and a failed start fails the run. `first_request`: called once, as the first model request goes
        out (the run leaves the start line, `runner.StartLine`)."""
        self.run_id = run_id
        self.agent = agent
        self.protocol = protocol
        self.limits = limits
        self.network = network
        """Whether its cells can open connections: the root model is told so."""
        self._repl = repl
        self.subcalls = subcalls
        self.usage = usage
        self.tree = tree
        self.depth = depth
        self.stream = stream or emit
        """The root's stream, where a child's events go (wrapped) whatever its depth."""
        self.children = children
        self.answer_check = answer_check
        """Consulted when a cell marks the answer ready: an answer it finds a problem with is not accepted."""
        self.model_settings = model_settings
        """Sent with every request of the root model (temperature, top_p, max_tokens, seed…)."""
        self._first_request = first_request
        self._told_stop = False
        self.emit = emit
        self.iteration = 0
        self.cells = 0
        self._turn_cells = (0, 0)  # (iteration, cells run in it): MAX_CELLS_PER_REPLY
        self.answer = ("", False)
        self.last_prose = ""
        self._progress: _CellProgress | None = None
        self._agent_usage = AgentUsage()
        self._reported_cost: float | None = None  # what the endpoint said the replies since `_account` cost

    # --- the REPL's side ---------------------------------------------------------------------

    async def batch(self, prompts_: list[str]) -> list[str]:
        """`llm_batch` of this run's cells: runs the sub-calls and reports their progress."""
        progress = self._progress or _CellProgress(self._emit_progress)
        return await self.subcalls.batch(prompts_, progress.batch_reporter())

    async def rlm(self, prompts_: list[str], contexts: list[str | None]) -> list[str]:
        """`rlm_batch` of this run's cells: child runs where the tree allows, plain sub-calls where it does not."""
        if self.children is None or not self.tree.can_recurse(self.depth):
            return await as_sub_calls(self.batch)(prompts_, contexts)
        return await self.children(self, prompts_, contexts)

    def _emit_progress(self, done: int, failed: int, total: int) -> None:
        self.emit(SubcallsEvent(run_id=self.run_id, iteration=self.iteration, done=done, failed=failed, total=total))

    async def _ready_repl(self) -> Repl:
        if isinstance(self._repl, asyncio.Future):
            self._repl = await self._repl
        return self._repl

    async def run_cell(self, code: str) -> str:
        """Run one cell, emit its events, and return the report the root model reads."""
        if self.answer[1]:
            return prompts.SKIPPED_AFTER_READY
        turn, ran = self._turn_cells
        ran = ran + 1 if turn == self.iteration else 1
        self._turn_cells = (self.iteration, ran)
        if ran > MAX_CELLS_PER_REPLY:  # said in full once; a reply of 100,000 calls is owed as many returns
            return prompts.skipped_past_the_cap(MAX_CELLS_PER_REPLY) if ran == MAX_CELLS_PER_REPLY + 1 else "Not run."
        repl = await self._ready_repl()  # raises the start's error, if it failed
        self.emit(CodeEvent(run_id=self.run_id, iteration=self.iteration, code=code))
        self.cells += 1
        progress = self._progress = _CellProgress(self._emit_progress)
        try:
            outcome = await repl.execute(code, self.limits.exec_timeout_s, self)
        finally:
            self._progress = None
        progress.flush()
        refusal = await self._check_answer(outcome)
        self._report_outcome(outcome)
        report = prompts.cell_report(outcome, turns_left=self.limits.max_iterations - self.iteration)
        if refusal:
            report += "\n" + refusal
        note = self.tree.note()
        if note and not self._told_stop:
            self._told_stop = True
            report += f"\n[{note}]"
        return report

    async def _check_answer(self, outcome: CellOutcome) -> str | None:
        """An answer the cell marked ready that `answer_check` refuses goes back to not ready, in the REPL too;
        returns what the root model is told about it."""
        if self.answer_check is None or not outcome.answer_ready:
            return None
        problem = await in_check_thread(self.answer_check.problem, outcome.answer_content)
        if problem is None:
            return None
        outcome.answer_ready = False
        await (await self._ready_repl()).execute(prompts.RESET_READY_CODE, self.limits.exec_timeout_s, self)
        return prompts.answer_refused(problem)

    def _report_outcome(self, outcome: CellOutcome) -> None:
        self.emit(
            OutputEvent(
                run_id=self.run_id,
                iteration=self.iteration,
                stdout=outcome.stdout,
                error=outcome.error,
                truncated=outcome.truncated,
                duration_ms=outcome.duration_ms,
            )
        )
        for image in outcome.figures:
            self.emit(FigureEvent(run_id=self.run_id, iteration=self.iteration, data=image))
        answer = (outcome.answer_content, outcome.answer_ready)
        if answer != self.answer:
            self.answer = answer
            self.emit(AnswerEvent(run_id=self.run_id, content=answer[0], ready=answer[1]))

    # --- the root model's side ---------------------------------------------------------------

    def _instructions(self) -> str:
        return prompts.system_prompt(
            self.protocol, self.limits, can_recurse=self.tree.can_recurse(self.depth), network=self.network
        )

    def _usage_limits(self) -> UsageLimits:
        # Our own iteration count is the real limit; this only keeps PydanticAI from stopping at 50.
        return UsageLimits(request_limit=self.limits.max_iterations * 3 + 10)

    def _note_response(self, response: ModelResponse) -> None:
        reported = (response.provider_details or {}).get(REPORTED_COST)
        if reported is not None:
            self._reported_cost = (self._reported_cost or 0.0) + reported
        self._account()  # now, so that a cost budget this reply spent holds for the cell it asks for
        texts = [part.content for part in response.parts if isinstance(part, TextPart) and part.content.strip()]
        if not texts:
            return
        text = "\n\n".join(texts)
        if self.protocol == "text":
            _, text = extract_code_blocks(text)
        if text.strip():
            self.last_prose = text.strip()
            self.emit(ThoughtEvent(run_id=self.run_id, iteration=self.iteration, text=text.strip()))

    def _account(self) -> None:
        """Fold the agent's usage into the run's, and the new tokens into the tree's cost."""
        root = self.usage.root
        new_input = self._agent_usage.input_tokens - root.input_tokens
        new_output = self._agent_usage.output_tokens - root.output_tokens
        root.requests = self._agent_usage.requests
        root.input_tokens = self._agent_usage.input_tokens
        root.output_tokens = self._agent_usage.output_tokens
        model = self.agent.model
        self.tree.add_cost(
            model.model_name if isinstance(model, Model) else str(model or ""),
            new_input,
            new_output,
            self._reported_cost,
        )
        self._reported_cost = None

    def _emit_usage(self) -> None:
        self._account()
        if self.depth == 0 and self.tree.limits.max_depth > 1:
            totals = self.tree.totals()
            self.emit(UsageEvent(run_id=self.run_id, root=totals.root, sub=totals.sub, by_depth=self.tree.by_depth()))
        else:
            self.emit(
                UsageEvent(run_id=self.run_id, root=self.usage.root.model_copy(), sub=self.usage.sub.model_copy())
            )

    async def _segment(self, message: str, history: list[ModelMessage] | None) -> tuple[list[ModelMessage], str | None]:
        """Walk one `agent.iter` run; returns the history and the reply text if the model ended in prose.

        Returns early (reply None) once the answer is ready or the iteration budget is spent.
        """
        async with self.agent.iter(
            message,
            message_history=history,
            usage=self._agent_usage,
            deps=self,
            instructions=self._instructions(),
            usage_limits=self._usage_limits(),
            model_settings=self.model_settings,
        ) as run:
            node = run.next_node
            while not Agent.is_end_node(node):
                if Agent.is_model_request_node(node):
                    if self.iteration >= self.limits.max_iterations or not self.tree.take_iteration(self.depth):
                        return run.all_messages(), None
                    self.iteration += 1
                    if self._first_request is not None:
                        self._first_request()
                        self._first_request = None
                    node = await run.next(node)
                    if Agent.is_call_tools_node(node):
                        self._note_response(node.model_response)
                elif Agent.is_call_tools_node(node):
                    node = await run.next(node)
                    if self.protocol == "tools":
                        self._emit_usage()
                    if self.answer[1]:
                        return run.all_messages(), None
                else:
                    node = await run.next(node)
            return run.all_messages(), str(node.data.output)

    async def run(self, task_message: str) -> RunOutcome:
        """Drive the root model until the answer is ready, the budget is spent, or it stops coding. (The
        REPL's start belongs to whoever made the REPL: a run that ends early leaves it to them.)"""
        return await self._turns(task_message)

    async def _turns(self, task_message: str) -> RunOutcome:
        history: list[ModelMessage] | None = None
        message = task_message
        reminded = False
        prose_answer = ""
        while not self.answer[1] and self.iteration < self.limits.max_iterations:
            history, reply = await self._segment(message, history)
            if reply is None:
                break
            blocks = extract_code_blocks(reply)[0] if self.protocol == "text" else []
            if blocks:
                reports = []
                for number, code in enumerate(blocks[:MAX_CELLS_PER_REPLY], 1):
                    report = await self.run_cell(code)
                    reports.append(f"[block {number}]\n{report}" if len(blocks) > 1 else report)
                if len(blocks) > MAX_CELLS_PER_REPLY:
                    skipped = f"blocks {MAX_CELLS_PER_REPLY + 1} to {len(blocks)}"
                    reports.append(f"[{skipped}]\n{prompts.skipped_past_the_cap(MAX_CELLS_PER_REPLY)}")
                self._emit_usage()
                message = "\n\n".join(reports)
                continue
            if self.protocol == "text":
                self._emit_usage()
            if reminded:
                prose_answer = self.last_prose
                break
            reminded = True
            message = prompts.REMINDER_TEXT if self.protocol == "text" else prompts.REMINDER_TOOLS
        content, ready = self.answer
        if self.cells == 0:
            return RunOutcome(
                answer="",
                ready=False,
                iterations=self.iteration,
                note=prompts.no_code_note(self.iteration, self.protocol),
            )
        return RunOutcome(answer=content or prose_answer, ready=ready, iterations=self.iteration)


async def run_python(ctx: RunContext[Controller], code: str) -> str:
    """Run Python code in the persistent REPL and return what it printed.

    Args:
        code: Python source. Variables persist between calls; `context`, `llm_query`, `llm_batch` and
            `answer` are predefined. The value of a bare last expression is shown, as in a notebook.
    """
    return await ctx.deps.run_cell(code)


def build_agent(model: Model, protocol: str) -> Agent[Controller, str]:
    """The root agent: with the `run_python` tool for the tools protocol, without tools for text.

    Runs can share one (the engine keeps it): building it parses the tool's docstring and schema.
    """
    tools = [Tool(run_python, name="run_python", sequential=True)] if protocol == "tools" else []
    return Agent(model, deps_type=Controller, tools=tools, output_type=str, retries=2)
