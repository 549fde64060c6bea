"""The events a run emits, as typed objects: the one definition of the event stream.

Each event's `type` literal is also its name on the wire (the SSE `event:` line) and its `seq` the
SSE `id:`; the JSON body is the model's dump. `Event` is the discriminated union of them all; its JSON
Schema (`python -m rlm_service.events`) ships with the page as `frontend/events.schema.json`, and a
test checks that every consumer (the page, the command line, the Markdown export) handles every type.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, TypeAdapter, field_validator

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD. JSON may carry one (`"\\ud800"`, from a client's
    request or a model's reply) and Python's parser keeps it, but UTF-8 cannot encode it: written as it is,
    it failed the event stream mid-run and the history's writes (a pair of surrogates is parsed as the one
    character it stands for, so any surrogate left is a lone one)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")  # a quarter of the time of a search for them (4 ms for 4 Mi characters)
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def valid_unicode_json(value: Any) -> Any:
    """A JSON value (dicts, lists, strings…) with `valid_unicode` applied to every string in it, keys too."""
    text = json.dumps(value, ensure_ascii=False)
    valid = valid_unicode(text)
    return value if valid is text else json.loads(valid)


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


class RunLimits(BaseModel):
    """What a run may spend: the server's settings, lowered by the request's own (`effective_limits`).

    Turns, sub-calls, time and cost are shared by every run of a recursive tree."""

    max_iterations: int
    max_subcalls: int
    exec_timeout_s: float
    subcall_concurrency: int
    max_output_chars: int
    max_depth: int = 1
    run_timeout_s: float | None = None
    max_cost_usd: float | None = None


class EventBase(BaseModel):
    """What every event carries; each subclass narrows `type` to its own literal."""

    type: str
    run_id: str
    seq: int = 0
    """The event's number in its run (1, 2, 3…), set when the run emits it; also the SSE `id:`."""
    ts: float = Field(default_factory=time.time)
    """When the event was created (Unix seconds), so clients can order, time and replay runs."""

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        """Every text of an event (a model's reply, its code, an error's message) can be sent and stored."""
        return valid_unicode(value) if isinstance(value, str) else value


class StartEvent(EventBase):
    type: Literal["start"] = "start"
    model: str
    sub_model: str
    input: InputInfo
    limits: RunLimits
    protocol: str = "tools"
    repl: str = "subprocess"
    session_id: str | None = None
    """The session this run belongs to (`settings.session`, or a follow-up), whose REPL outlives it."""


class ThoughtEvent(EventBase):
    type: Literal["thought"] = "thought"
    iteration: int
    text: str


class CodeEvent(EventBase):
    type: Literal["code"] = "code"
    iteration: int
    code: str


class SubcallsEvent(EventBase):
    type: Literal["subcalls"] = "subcalls"
    iteration: int
    done: int
    failed: int
    total: int


class OutputEvent(EventBase):
    type: Literal["output"] = "output"
    iteration: int
    stdout: str
    error: str | None = None
    truncated: bool = False
    duration_ms: int


class FigureEvent(EventBase):
    type: Literal["figure"] = "figure"
    iteration: int
    mime: str = "image/png"
    data: str
    """The image, base64."""


class AnswerEvent(EventBase):
    type: Literal["answer"] = "answer"
    content: str
    ready: bool


class UsageEvent(EventBase):
    type: Literal["usage"] = "usage"
    root: Usage
    sub: Usage
    by_depth: dict[str, RunUsage] | None = None
    """With recursion: usage of each depth of the tree (root and sub add up over all of them)."""


class FinalEvent(EventBase):
    type: Literal["final"] = "final"
    answer: str
    ready: bool
    iterations: int
    usage: RunUsage
    elapsed_ms: int
    by_depth: dict[str, RunUsage] | None = None
    cost_usd: float | None = None
    """Where the endpoint reports cost or RLM_PRICES knows the models."""
    note: str | None = None
    """Why the answer is empty or not to be trusted, in words for the user (the root model wrote no code)."""
    answer_json: Any = None
    """With `settings.answer_schema`: the answer parsed as JSON, when it satisfies the schema."""


class ParentRef(BaseModel):
    run_id: str
    iteration: int


class ChildEvent(EventBase):
    """An event of a child run (started by `rlm_query`/`rlm_batch`), carried in its root's stream."""

    type: Literal["child"] = "child"
    depth: int
    parent: ParentRef
    event: str
    data: dict[str, Any]


ErrorCode = Literal["auth", "model_unavailable", "timeout", "cancelled", "budget", "internal", "lost"]
"""`lost`: the process that ran the run died; its followers are told within RLM_REPLICA_TIMEOUT_S."""


class ErrorEvent(EventBase):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    answer: str | None = None


def lost_event(run_id: str, last_seq: int, why: str) -> ErrorEvent:
    """The terminal event of a run that has none of its own (its process stopped before writing one), so that
    every stream of it still ends with exactly one terminal event."""
    return ErrorEvent(run_id=run_id, seq=last_seq + 1, code="lost", message=why)


Event = Annotated[
    StartEvent
    | ThoughtEvent
    | CodeEvent
    | SubcallsEvent
    | OutputEvent
    | FigureEvent
    | AnswerEvent
    | UsageEvent
    | FinalEvent
    | ErrorEvent
    | ChildEvent,
    Field(discriminator="type"),
]

EVENT_TYPES: tuple[str, ...] = tuple(
    get_args(cls.model_fields["type"].annotation)[0] for cls in get_args(get_args(Event)[0])
)
"""Every event name, in the union's order."""
TERMINAL_EVENTS = ("final", "error")

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def is_terminal(event: EventBase) -> bool:
    return event.type in TERMINAL_EVENTS


def parse_event(data: dict[str, Any]) -> Event:
    """An event from its JSON body (as stored or received); raises `pydantic.ValidationError`."""
    return _ADAPTER.validate_python(data)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every event, keyed by its `type`."""
    return _ADAPTER.json_schema()


def sse_safe(text: str) -> str:
    """JSON text with the line breaks that JSON leaves raw and SSE does not split at (NEL, U+2028, U+2029) escaped:
    readers that split lines as Python's `str.splitlines` does (httpx's `iter_lines`) would cut an event there.
    Each is looked for with `in` first: most texts hold none, and a regular expression is far slower."""
    if "\x85" not in text and "\u2028" not in text and "\u2029" not in text:
        return text
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=1))
