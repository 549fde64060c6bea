"""Recursion: a tree of RLM runs that share one budget.

The root run is depth 0. A run at depth d may start children (`rlm_query`/`rlm_batch` in its REPL) only
if d + 1 < RLM_MAX_DEPTH; otherwise those functions are plain sub-calls. Whatever the depth, the tree
shares its budgets: sub-calls (RLM_MAX_SUBCALLS), root turns (RLM_MAX_ITERATIONS, counted over every
run of the tree), wall time (RLM_RUN_TIMEOUT_S) and cost (RLM_MAX_COST_USD, where the endpoint reports
it or RLM_PRICES knows the model). When one is spent, runs end with their best answer at their next
turn, and every run still going is told why in its next cell report.

A child's events reach the root's stream wrapped in `child` events, with the child's depth and its
parent (the run that started it and that run's iteration), so the root still ends with exactly one
terminal event of its own and a client can fold the tree.
"""

from __future__ import annotations

import asyncio
import time

from .events import RunLimits, RunUsage
from .llm import Completion, SubcallBudget


class RunTree:
    """What every run of one tree shares: budgets, usage by depth, the root's run id."""

    def __init__(
        self,
        root_run_id: str,
        limits: RunLimits,
        subcalls: SubcallBudget,
        *,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        """`prices`: USD per million input and output tokens, by model (RLM_PRICES)."""
        self.root_run_id = root_run_id
        self.limits = limits
        self.prices = prices or {}
        self.subcalls = subcalls
        self.started = time.monotonic()
        self.iterations = 0
        self.cost_usd = 0.0
        self.cost_known = False
        self.stop_reason: str | None = None
        self.iterations_spent = False
        self.last_turn_given = False
        self._nodes: list[tuple[int, RunUsage]] = []
        self._children: dict[int, asyncio.Semaphore] = {}

    def children_at(self, depth: int) -> asyncio.Semaphore:
        """The slots of the child runs at `depth` (RLM_SUBCALL_CONCURRENCY of them in flight at once). One set per
        depth, and not the sub-call semaphore: a run holding a slot waits for its own children, and a set shared
        with them would deadlock the tree once its slots were all held by runs waiting for a child."""
        return self._children.setdefault(depth, asyncio.Semaphore(self.subcalls.concurrency))

    def can_recurse(self, depth: int) -> bool:
        return depth + 1 < self.limits.max_depth

    def register(self, depth: int) -> RunUsage:
        """A run of the tree starts: the usage object it keeps up to date."""
        usage = RunUsage()
        self._nodes.append((depth, usage))
        return usage

    def totals(self) -> RunUsage:
        total = RunUsage()
        for _, usage in self._nodes:
            _add(total, usage)
        return total

    def by_depth(self) -> dict[str, RunUsage]:
        depths: dict[str, RunUsage] = {}
        for depth, usage in sorted(self._nodes, key=lambda node: node[0]):
            _add(depths.setdefault(str(depth), RunUsage()), usage)
        return depths

    def check(self) -> str | None:
        """Why the tree must stop now, time or cost (and remember it), or None while both hold."""
        if self.stop_reason is None:
            if self.limits.run_timeout_s is not None and time.monotonic() - self.started >= self.limits.run_timeout_s:
                self._stop("time")
            elif self.limits.max_cost_usd is not None and self.cost_usd >= self.limits.max_cost_usd:
                self._stop("cost")
        return self.stop_reason

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.subcalls.stopped = reason

    def take_iteration(self, depth: int = 0) -> bool:
        """Count one root turn of any run of the tree; False when the tree may take no more.

        Once time or cost is spent, the root still gets one last turn, to be told and to write its
        answer from what its children returned; children get none.
        """
        if self.check() is not None:
            if depth == 0 and not self.last_turn_given:
                self.last_turn_given = True
                self.iterations += 1
                return True
            return False
        if self.iterations >= self.limits.max_iterations:
            self.iterations_spent = True
            return False
        self.iterations += 1
        return True

    def add_cost(self, model: str, input_tokens: int, output_tokens: int, reported: float | None = None) -> None:
        if reported is not None:
            self.cost_usd += reported
            self.cost_known = True
        elif model in self.prices:
            per_input, per_output = self.prices[model]
            self.cost_usd += (input_tokens * per_input + output_tokens * per_output) / 1_000_000
            self.cost_known = True
        self.check()

    def sub_cost(self, model: str, completion: Completion) -> None:
        self.add_cost(model, completion.input_tokens, completion.output_tokens, completion.cost)

    def note(self) -> str | None:
        """What runs are told once a budget of the tree is spent."""
        reason = self.stop_reason or ("iteration" if self.iterations_spent else None)
        if reason is None:
            return None
        return (
            f"The run's {reason} budget is spent: finish now with the best answer you have "
            "(child runs end with theirs)."
        )


def _add(total: RunUsage, usage: RunUsage) -> None:
    for mine, theirs in ((total.root, usage.root), (total.sub, usage.sub)):
        mine.add(theirs.requests, theirs.input_tokens, theirs.output_tokens)
