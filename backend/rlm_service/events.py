"""The events a run emits, as typed objects.

Each event's `type` literal is also its name on the wire (the SSE `event:` line); the JSON body is the
model's dump, `run_id` included. The service encodes them; the UI switches on the same names.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    """Token counts of one model role (root or sub)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, requests: int = 0, input_tokens: int = 0, output_tokens: int = 0) -> None:
        self.requests += requests
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens


class RunUsage(BaseModel):
    root: Usage = Field(default_factory=Usage)
    sub: Usage = Field(default_factory=Usage)


class InputInfo(BaseModel):
    chars: int
    lines: int


class Limits(BaseModel):
    max_iterations: int
    max_subcalls: int
    exec_timeout_s: float
    subcall_concurrency: int
    max_output_chars: int


class _Event(BaseModel):
    run_id: str
    ts: float = Field(default_factory=time.time)
    """When the event was created (Unix seconds), so clients can order, time and replay runs."""


class StartEvent(_Event):
    type: Literal["start"] = "start"
    model: str
    sub_model: str
    input: InputInfo
    limits: Limits
    protocol: str = "tools"
    repl: str = "subprocess"


class ThoughtEvent(_Event):
    type: Literal["thought"] = "thought"
    iteration: int
    text: str


class CodeEvent(_Event):
    type: Literal["code"] = "code"
    iteration: int
    code: str


class SubcallsEvent(_Event):
    type: Literal["subcalls"] = "subcalls"
    iteration: int
    done: int
    failed: int
    total: int


class OutputEvent(_Event):
    type: Literal["output"] = "output"
    iteration: int
    stdout: str
    error: str | None = None
    truncated: bool = False
    duration_ms: int


class FigureEvent(_Event):
    type: Literal["figure"] = "figure"
    iteration: int
    mime: str = "image/png"
    data: str
    """The image, base64."""


class AnswerEvent(_Event):
    type: Literal["answer"] = "answer"
    content: str
    ready: bool


class UsageEvent(_Event):
    type: Literal["usage"] = "usage"
    root: Usage
    sub: Usage
    by_depth: dict[str, RunUsage] | None = None
    """With recursion: usage of each depth of the tree (root and sub add up over all of them)."""


class FinalEvent(_Event):
    type: Literal["final"] = "final"
    answer: str
    ready: bool
    iterations: int
    usage: RunUsage
    elapsed_ms: int
    by_depth: dict[str, RunUsage] | None = None
    cost_usd: float | None = None
    """Where the endpoint reports cost or RLM_PRICES knows the models."""


class ParentRef(BaseModel):
    run_id: str
    iteration: int


class ChildEvent(_Event):
    """An event of a child run (started by `rlm_query`/`rlm_batch`), carried in its root's stream."""

    type: Literal["child"] = "child"
    depth: int
    parent: ParentRef
    event: str
    data: dict[str, Any]


ErrorCode = Literal["auth", "model_unavailable", "timeout", "cancelled", "budget", "internal"]


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    answer: str | None = None


Event = Annotated[
    StartEvent | ThoughtEvent | CodeEvent | SubcallsEvent | OutputEvent | FigureEvent | AnswerEvent | UsageEvent
    | FinalEvent | ErrorEvent | ChildEvent,
    Field(discriminator="type"),
]

TERMINAL_EVENTS = ("final", "error")


def is_terminal(event: _Event) -> bool:
    return getattr(event, "type", None) in TERMINAL_EVENTS
