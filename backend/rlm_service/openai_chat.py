"""What the OpenAI-compatible endpoint speaks: chat requests in, a run's input and task out, chunks back.

A chat conversation becomes an RLM run this way: every message, rendered as text, is the input (`context`),
each one under a header line of its own:

    --- system ---
    You answer tersely.
    --- user ---
    Here is the log: ...
    --- assistant ---
    ...
    --- user ---
    Which errors are most frequent?

and the last user message is the task. A last user message longer than RLM_MAX_PROMPT_CHARS would cost
the root model its whole length on every turn, so the task then shows its beginning and its end and says
that the whole of it is the last message in `context`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from pydantic_ai.settings import ModelSettings

from .events import CodeEvent, EventBase, FigureEvent, OutputEvent, StartEvent, ThoughtEvent, sse_safe

MODEL_ID = "rlm"
TASK_EDGE_CHARS = 2000
"""Characters of each end of an over-long last user message shown in the task."""
OUTPUT_SHOWN_CHARS = 600
"""Characters of a cell's output shown in the progress (`reasoning_content`) of a stream."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: StrictStr | None = None
    refusal: StrictStr | None = None
    """An assistant's refusal, the other kind of part OpenAI's assistant messages hold (a client that replays a
    conversation sends it back)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "answer"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:  # as OpenAI refuses it: a missing parameter
            raise ValueError("type json_schema needs json_schema: {'name': ..., 'schema': {...}}")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`: the parameters that mean something here; any other is ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False  # (not "yes", nor "false", which lax validation takes for true and false)
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    # bounded as model servers read them (llama.cpp and vLLM take 32- and 64-bit integers): a larger number is
    # refused here rather than failing the run at its first model request
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    response_format: ResponseFormat | None = None

    def model_settings(self) -> ModelSettings:
        """The root model's settings this request sets."""
        settings = ModelSettings()
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        if (max_tokens := self.max_completion_tokens or self.max_tokens) is not None:
            settings["max_tokens"] = max_tokens
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must satisfy: `json_schema`'s, any JSON object for `json_object`."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        assert fmt.json_schema is not None  # (checked as the request was read)
        return fmt.json_schema.schema_


class BadConversation(ValueError):
    """Messages that cannot become a run (no user message, a non-text part)."""


def message_text(message: ChatMessage, number: int) -> str:
    """A message's text: its text parts, and an assistant's refusals; other parts are refused."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type not in ("text", "refusal"):
            raise BadConversation(f"messages[{number}]: only text content is supported, not a {part.type!r} part")
        text = part.text if part.type == "text" else part.refusal
        if text is None:
            raise BadConversation(f"messages[{number}]: a {part.type!r} part without its {part.type!r} string")
        texts.append(text)
    return "\n".join(texts)


def render(messages: list[ChatMessage]) -> tuple[str, str]:
    """The conversation as the run's input text, and the last user message."""
    lines: list[str] = []
    last_user: str | None = None
    for number, message in enumerate(messages):
        text = message_text(message, number)
        label: str = message.role
        if message.name:
            label += f" ({message.name})"
        if message.tool_call_id:
            label += f" (call {message.tool_call_id})"
        lines.append(f"--- {label} ---")
        if text:
            lines.append(text)
        for call in message.tool_calls or []:
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            lines.append(f"[tool call {function.get('name', '?')}: {function.get('arguments', '')}]")
        if message.role == "user":
            last_user = text
    if last_user is None:
        raise BadConversation("messages: there is no user message, so there is no task")
    if not last_user.strip():
        raise BadConversation("messages: the last user message is empty, so there is no task")
    return "\n".join(lines) + "\n", last_user


def task_of(last_user: str, limit: int) -> str:
    """The task the root model reads: the last user message, or its ends when it is longer than `limit`."""
    if len(last_user) <= limit:
        return last_user
    edge = min(TASK_EDGE_CHARS, limit // 3)
    return (
        f"(The user's last message is {len(last_user):,} characters long; the whole of it is the last "
        f"message in `context`. Its beginning and its end:)\n{last_user[:edge]}\n[…]\n{last_user[-edge:]}"
    )


class Progress:
    """A run's events as the text of a stream's `reasoning_content` deltas."""

    def __init__(self) -> None:
        self.iteration = 0

    def text(self, event: EventBase) -> str | None:
        if isinstance(event, StartEvent):
            return f"RLM run {event.run_id}: {event.input.chars:,} characters of input.\n"
        iteration = getattr(event, "iteration", None)
        header = ""
        if isinstance(iteration, int) and iteration != self.iteration:
            self.iteration = iteration
            header = f"\n## Iteration {iteration}\n"
        if isinstance(event, ThoughtEvent):
            return f"{header}{event.text}\n"
        if isinstance(event, CodeEvent):
            return f"{header}```python\n{event.code.rstrip()}\n```\n"
        if isinstance(event, OutputEvent):
            shown = (
                event.stdout
                if len(event.stdout) <= OUTPUT_SHOWN_CHARS
                else (event.stdout[:OUTPUT_SHOWN_CHARS] + f"… ({len(event.stdout):,} characters)")
            )
            if event.error and event.error.strip():
                shown = shown.rstrip() + "\n" + event.error.strip().splitlines()[-1]
            return f"{header}```text\n{shown.strip() or '(no output)'}\n```\n"
        if isinstance(event, FigureEvent):
            return f"{header}(a figure was drawn)\n"
        return None


def subcalls_text(done: int, failed: int, total: int) -> str:
    return f"sub-calls: {done}/{total} done" + (f", {failed} failed" if failed else "") + "\n"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def dumps(value: Any) -> str:
    """Compact JSON for a stream's `data:` line, with nothing in it that a line reader splits at (`sse_safe`)."""
    return sse_safe(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
