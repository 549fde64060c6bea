"""Unreliable model servers: every fault the fake OpenAI server can inject, for sub-calls and for the root."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from rlm_service.engine import Engine
from rlm_service.events import EventBase
from tests.conftest import make_settings, script
from tests.fake_openai import FakeOpenAI, HTTPFault

BATCH_CELL = "replies = llm_batch(['a', 'b', 'c'])\nfor r in replies:\n    print(r[:80])"
FINISH = "answer.update(content='\\n'.join(replies), ready=True)"


async def run(fake: FakeOpenAI | None, prompt: str, **overrides: Any) -> list[EventBase]:
    settings = make_settings(fake, **overrides)
    async with Engine(settings) as engine:
        return [event async for event in engine.run(prompt, "input text")]


def batch_prompt() -> str:
    return script({"code": [BATCH_CELL]}, {"code": [FINISH]})


TRANSIENT_SUB_FAULTS = [
    {"kind": "status", "status": 429, "retry_after": "1"},
    {"kind": "status", "status": 429},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 502},
    {"kind": "status", "status": 503},
    {"kind": "timeout"},
    {"kind": "disconnect"},
    {"kind": "malformed"},
    {"kind": "deep", "status": 200},
    {"kind": "deep", "status": 503},
    {"kind": "string_error", "status": 503},
    {"kind": "empty_choices"},
    {"kind": "null_content"},
    {"kind": "cut_stream"},
    {"kind": "trickle"},
]


@pytest.mark.parametrize("fault", TRANSIENT_SUB_FAULTS, ids=lambda f: f"{f['kind']}-{f.get('status', '')}")
async def test_sub_call_fault_is_retried(fake: FakeOpenAI, fault: dict[str, Any]) -> None:
    fake.inject(role="sub", count=2, **fault)
    started = time.monotonic()
    events = await run(fake, batch_prompt(), rlm_subcall_timeout_s=1.5)
    final = events[-1]
    assert final.type == "final" and final.ready
    assert "Error" not in final.answer and final.answer.count("sub-model reply") == 3
    if fault.get("retry_after"):
        assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize(
    "fault",
    [{"kind": "status", "status": 500}, {"kind": "malformed"}, {"kind": "null_content"}, {"kind": "disconnect"}],
    ids=lambda f: f["kind"],
)
async def test_sub_call_that_keeps_failing_becomes_an_error_slot(fake: FakeOpenAI, fault: dict[str, Any]) -> None:
    fake.inject(role="sub", count=1000, **fault)
    events = await run(fake, batch_prompt(), rlm_model_retries=1)
    final = events[-1]
    assert final.type == "final" and final.ready
    assert [line.startswith("Error: ") for line in final.answer.splitlines()] == [True] * 3
    progress = [e for e in events if e.type == "subcalls"][-1]
    assert progress.done == progress.total == progress.failed == 3


async def test_an_error_given_as_a_string_is_quoted(fake: FakeOpenAI) -> None:
    """A model server whose error body is `{"error": "<message>"}` (Hugging Face's TGI, Ollama's own API), not
    OpenAI's `{"error": {"message": ...}}`: reading it raised AttributeError, so the sub-call's slot said
    `Error: AttributeError: 'str' object has no attribute 'get'`; the message is now quoted as it is."""
    fake.inject("string_error", role="sub", status=400, count=1)
    events = await run(fake, batch_prompt())
    lines = events[-1].answer.splitlines()
    quoted = "Error: HTTP 400 from the model server: injected HTTP 400"
    assert sum(line.startswith(quoted) for line in lines) == 1, lines


@pytest.mark.parametrize(
    "count", ["n/a", float("inf"), [1], -5, 2.5], ids=["text", "inf", "list", "negative", "fraction"]
)
async def test_token_counts_of_another_type_leave_the_replies_whole(fake: FakeOpenAI, count: Any) -> None:
    """Replies whose `usage` counts are not whole numbers of 0 or more (text, Infinity, a list, a negative or
    fractional number): a sub-call's reply was lost to `Error: ValueError` (or TypeError, OverflowError) and a
    negative count lowered the run's usage; such a count is now read as 0, as the root model's are, and the
    replies are whole."""
    fake.usage_fields = {"prompt_tokens": count, "completion_tokens": count}
    final = (await run(fake, batch_prompt()))[-1]
    assert final.type == "final" and final.answer.count("sub-model reply") == 3, final
    assert final.usage.sub.requests == 3 and final.usage.sub.input_tokens == final.usage.sub.output_tokens == 0


async def test_content_parts_without_text_are_left_out(fake: FakeOpenAI) -> None:
    """Replies whose content comes in parts, some with a `text` that is not a string (null, a number): a
    sub-call's reply was lost to `Error: TypeError`, and the root model's prose read `None…`; the parts with
    text make the reply, the others are left out."""
    parts = [{"type": "text", "text": None}, {"type": "text", "text": 5}, {"type": "text", "text": "part"}]
    fake.message_fields = {"sub": {"content": parts}}
    final = (await run(fake, batch_prompt()))[-1]
    assert final.type == "final" and final.answer.splitlines() == ["part"] * 3, final
    fake.message_fields = {"root": {"content": [{"type": "text", "text": None}, {"type": "text", "text": "prose"}]}}
    events = await run(fake, batch_prompt(), rlm_max_iterations=1)
    assert [e.text for e in events if e.type == "thought"] == ["prose"], events


async def test_tool_calls_that_are_not_a_list_are_no_calls(fake: FakeOpenAI) -> None:
    """A root reply whose `tool_calls` is not a list (a number): the run ended with error internal (TypeError:
    'int' object is not iterable); the reply is read as one without calls, as one whose calls are malformed."""
    fake.message_fields = {"root": {"tool_calls": 5, "content": "no code"}}
    events = await run(fake, batch_prompt(), rlm_max_iterations=2)
    assert events[-1].type == "final" and events[-1].note, events[-1]


async def test_one_bad_sub_call_keeps_the_others(fake: FakeOpenAI) -> None:
    fake.inject("status", role="sub", status=400, count=1)
    events = await run(fake, batch_prompt())
    lines = events[-1].answer.splitlines()
    assert sum(line.startswith("Error: HTTP 400") for line in lines) == 1
    assert sum("sub-model reply" in line for line in lines) == 2


@pytest.mark.parametrize(
    "fault",
    [{"kind": "status", "status": 429}, {"kind": "status", "status": 503}, {"kind": "disconnect"}],
    ids=lambda f: f"{f['kind']}-{f.get('status', '')}",
)
async def test_root_fault_is_retried(fake: FakeOpenAI, fault: dict[str, Any]) -> None:
    fake.inject(role="root", count=1, **fault)
    events = await run(fake, batch_prompt())
    assert events[-1].type == "final" and events[-1].ready


@pytest.mark.parametrize(
    ("fault", "code", "attempts"),
    [
        ({"kind": "status", "status": 401}, "auth", 1),
        ({"kind": "status", "status": 403}, "auth", 1),
        ({"kind": "status", "status": 500}, "model_unavailable", 2),
        ({"kind": "status", "status": 502}, "model_unavailable", 2),
        ({"kind": "status", "status": 503}, "model_unavailable", 2),
        ({"kind": "status", "status": 429, "retry_after": "0"}, "model_unavailable", 2),
        ({"kind": "status", "status": 404}, "model_unavailable", 1),
        ({"kind": "timeout"}, "model_unavailable", 2),
        ({"kind": "malformed"}, "model_unavailable", 2),
        ({"kind": "deep", "status": 200}, "model_unavailable", 2),
        ({"kind": "deep", "status": 500}, "model_unavailable", 2),
        ({"kind": "string_error", "status": 401}, "auth", 1),
        ({"kind": "string_error", "status": 500}, "model_unavailable", 2),
        ({"kind": "empty_choices"}, "model_unavailable", 2),
        ({"kind": "cut_stream"}, "model_unavailable", 2),
        ({"kind": "trickle"}, "model_unavailable", 2),
        ({"kind": "disconnect"}, "model_unavailable", 2),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}-{v.get('status', '')}" if isinstance(v, dict) else "",
)
async def test_root_fault_that_persists_ends_with_the_right_code(
    fake: FakeOpenAI, fault: dict[str, Any], code: str, attempts: int
) -> None:
    """With one retry allowed, a transient fault costs two attempts, an answer that retrying cannot change
    (401, 403, 404) one. Mutants caught: 401/403 retried (two attempts); a transient fault not retried."""
    fake.inject(role="root", count=1000, **fault)
    events = await run(fake, batch_prompt(), rlm_model_retries=1, rlm_root_timeout_s=1.5)
    assert [e.type for e in events] == ["start", "error"]
    assert events[-1].code == code
    assert "sk-test-key" not in events[-1].message
    assert fake.stats.root_requests == attempts


async def test_root_null_content_ends_the_run_with_model_unavailable(fake: FakeOpenAI) -> None:
    """A root model that keeps replying with nothing (`content: null`, cut by its token limit) ends the run
    with `model_unavailable` and a message that says so."""
    fake.inject("null_content", role="root", count=1000)
    events = await run(fake, batch_prompt(), rlm_model_retries=1)
    assert [e.type for e in events] == ["start", "error"]
    assert events[-1].code == "model_unavailable" and "token limit" in events[-1].message


def _root_call(name: str, arguments: str) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"content": None, "tool_calls": [call]}


@pytest.mark.parametrize(
    ("protocol", "message", "said"),
    [
        ("tools", _root_call("run_python", "{code: print(1)"), ["'run_python' wrongly 3 times", "Invalid JSON"]),
        ("tools", _root_call("run_python", '{"source": "x"}'), ["wrongly 3 times", "code: Field required"]),
        ("tools", _root_call("python", '{"code": "x"}'), ["'python' wrongly 3 times", "Available tools: 'run_python'"]),
        ("text", _root_call("run_python", '{"code": "x"}'), ["'run_python' 3 times", "offered none"]),
        ("tools", {"content": ""}, ["empty (neither text nor code) 3 times"]),
        ("text", {"content": ""}, ["empty (neither text nor code) 3 times"]),
    ],
    ids=["invalid-json", "wrong-argument", "unknown-tool", "tool-call-in-text", "empty-tools", "empty-text"],
)
async def test_root_replies_that_cannot_be_used_are_said_in_words(
    protocol: str, message: dict[str, Any], said: list[str]
) -> None:
    """A root model whose replies cannot be acted on, again and again: tool calls with arguments that are not JSON
    or lack `code`, calls of a tool that does not exist (or any tool, with the text protocol), empty replies (as a
    small model on llama.cpp sends). The run ended with PydanticAI's words, "Tool 'run_python' exceeded max retries
    count of 2. Consider raising the retry limit, or see the docs on tool retries: https://pydantic.dev/…" or
    "Exceeded maximum output retries (2)", which named a setting the service has not and not what the model sent."""
    with FakeOpenAI(root=lambda messages, body: {"text": "", "code": []}) as fake:
        fake.message_fields = {"root": message}
        events = await run(fake, "anything", rlm_root_protocol=protocol, rlm_max_iterations=5)
    error = events[-1]
    assert error.type == "error" and error.code == "model_unavailable", error
    assert all(words in error.message for words in said), error.message
    assert "pydantic" not in error.message and "retry limit" not in error.message, error.message


async def test_a_server_quoting_the_key_back_does_not_reach_code_or_events(fake: FakeOpenAI) -> None:
    def quoting(prompt: str) -> str:
        raise HTTPFault(401, "Incorrect API key provided: sk-test-key. Find your key at your account page.")

    fake.sub = quoting
    events = await run(fake, script({"code": ["print(llm_query('a'))"]}, {"code": [FINISH.replace("replies", "[]")]}))
    outputs = [e for e in events if e.type == "output"]
    assert "refused the key" in outputs[0].stdout and "Incorrect API key provided: ***" in outputs[0].stdout
    assert all("sk-test-key" not in e.model_dump_json() for e in events)


async def test_replies_in_a_looser_shape_are_read(fake: FakeOpenAI) -> None:
    fake.loose = True
    events = await run(fake, batch_prompt())
    assert events[-1].type == "final" and events[-1].ready, events[-1]
    assert events[-1].answer.startswith("sub-model reply")


async def test_tool_calls_sharing_an_id_all_run(fake: FakeOpenAI) -> None:
    """A reply whose two tool calls carry the same id: both cells run, in order, and the next request gives each
    result an id of its own that matches a call. Old behaviour caught (the attack pass): PydanticAI refused the
    reply ("tool calls must have unique tool_call_id values") and the run ended as model_unavailable."""
    fake.call_id = "same"
    finish = "answer.update(content=str(x), ready=True)"
    events = await run(fake, script({"code": ["x = 1", "x += 1"]}, {"code": [finish]}))
    assert events[-1].type == "final" and events[-1].answer == "2", events[-1]
    second = fake.stats.root_bodies[1]["messages"]
    calls = [call["id"] for message in second if message["role"] == "assistant" for call in message["tool_calls"]]
    results = [message["tool_call_id"] for message in second if message["role"] == "tool"]
    assert len(set(calls[:2])) == 2 and results[:2] == calls[:2], second


async def test_connection_refused_is_model_unavailable() -> None:
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/v1"
        events = await run(None, "anything", openai_api_base=url, rlm_model_retries=1)
    assert [e.type for e in events] == ["start", "error"]
    assert events[-1].code == "model_unavailable"


async def test_wrong_key_is_auth(fake: FakeOpenAI) -> None:
    """A key the server refuses ends the run at once. Mutant caught: 401 retried (three requests)."""
    fake.api_key = "sk-the-right-one"
    events = await run(fake, "anything")
    assert events[-1].type == "error" and events[-1].code == "auth"
    assert fake.stats.requests == fake.stats.root_requests == 1
