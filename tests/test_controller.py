"""The root loop, scripted turn by turn with PydanticAI's FunctionModel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from rlm_service import prompts
from rlm_service.controller import extract_code_blocks
from rlm_service.engine import Engine, RunSettings
from rlm_service.events import EventBase
from rlm_service.repl.workspace import Workspace, instance_directory
from tests.conftest import folded, make_settings, script
from tests.fake_openai import FakeOpenAI

Turn = list[Any]


def code(source: str) -> ToolCallPart:
    return ToolCallPart("run_python", {"code": source})


def scripted(*turns: Turn, seen: list[list[ModelMessage]] | None = None) -> FunctionModel:
    """A root model that plays `turns` in order (then keeps repeating prose)."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if seen is not None:
            seen.append(list(messages))
        index = sum(1 for message in messages if isinstance(message, ModelResponse))
        parts = turns[index] if index < len(turns) else [TextPart("nothing more")]
        return ModelResponse(parts=[TextPart(p) if isinstance(p, str) else p for p in parts])

    return FunctionModel(respond)


async def collect(
    fake: FakeOpenAI,
    model: FunctionModel | Callable[..., Any],
    *,
    prompt: str = "do it",
    input_data: str = "some input",
    run_settings: RunSettings | None = None,
    **overrides: Any,
) -> list[EventBase]:
    settings = make_settings(fake, **overrides)
    async with Engine(settings, root_model=model) as engine:
        return [event async for event in engine.run(prompt, input_data, run_settings)]


def types(events: list[EventBase]) -> list[str]:
    return [event.type for event in events]  # type: ignore[attr-defined]


def tool_returns(messages: list[ModelMessage]) -> list[str]:
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    ]


def user_prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


async def test_event_sequence_of_a_run(fake: FakeOpenAI) -> None:
    model = scripted(
        ["Looking first.", code("print(len(context))")],
        [code("notes = llm_batch(['a', 'b'])\nnotes")],
        [code("answer['content'] = ' & '.join(notes)\nanswer['ready'] = True")],
    )
    events = await collect(fake, model, input_data="0123456789")
    assert folded([(event.type, event.model_dump()) for event in events]) == [  # type: ignore[attr-defined]
        "start",
        "thought",
        "code",
        "output",
        "usage",
        "code",
        "subcalls",
        "output",
        "usage",
        "code",
        "output",
        "answer",
        "usage",
        "final",
    ]
    start, final = events[0], events[-1]
    assert start.input.chars == 10 and start.model == "root-model" and start.sub_model == "sub-model"
    assert events[3].stdout == "10\n"
    assert final.ready and final.iterations == 3 and final.answer.count("sub-model reply") == 2
    assert final.usage.root.requests == 3 and final.usage.sub.requests == 2
    assert len({event.run_id for event in events}) == 1


async def test_stops_right_after_the_ready_cell(fake: FakeOpenAI) -> None:
    seen: list[list[ModelMessage]] = []
    model = scripted(
        [code("steps = ['one']"), code("answer.update(content='done', ready=True)"), code("steps.append('never')")],
        seen=seen,
    )
    events = await collect(fake, model)
    assert types(events).count("code") == 2
    assert events[-1].type == "final" and events[-1].ready and events[-1].iterations == 1
    assert len(seen) == 1


async def test_tool_calls_of_one_reply_run_in_order(fake: FakeOpenAI) -> None:
    model = scripted(
        [code("order = []"), *[code(f"import time\ntime.sleep(0.0{5 - i})\norder.append({i})") for i in range(5)]],
        [code("answer['content'] = str(order)\nanswer['ready'] = True")],
    )
    events = await collect(fake, model)
    assert events[-1].answer == "[0, 1, 2, 3, 4]"


async def test_one_reply_runs_at_most_twenty_cells(fake: FakeOpenAI) -> None:
    """A reply with 25 calls runs the first 20 in order; the model is told that the other 5 did not run, and its
    next reply runs cells again. Mutant: no cap (25 `code` events; the attack pass's reply of 10,000 calls ran them
    all, the server's memory growing by 400 MB)."""
    seen: list[list[ModelMessage]] = []
    model = scripted(
        [code("ran = []"), *[code(f"ran.append({i})") for i in range(24)]],
        [code("answer.update(content=str(len(ran)), ready=True)")],
        seen=seen,
    )
    events = await collect(fake, model)
    assert types(events).count("code") == 21
    assert events[-1].type == "final" and events[-1].answer == "19" and events[-1].ready
    skipped = [text for text in tool_returns(seen[1]) if text.startswith("Not run")]
    assert len(skipped) == 5 and "at most 20 cells" in skipped[0]
    assert skipped[1:] == ["Not run."] * 4  # each call is owed a return: the reason is said once


async def test_one_text_reply_runs_at_most_twenty_blocks(fake: FakeOpenAI) -> None:
    """With the text protocol, a reply of 10,000 blocks runs the first 20, and the model reads their reports and
    one line for the rest. Mutants: no cap for blocks (10,001 `code` events); a report for each block not run (the
    review: 100,000 of them made the next request 15 MB)."""
    seen: list[list[ModelMessage]] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(list(messages))
        if len(seen) == 1:
            blocks = ["```repl\nran = []\n```", *(f"```repl\nran.append({i})\n```" for i in range(9_999))]
            return ModelResponse(parts=[TextPart("\n".join(blocks))])
        return ModelResponse(parts=[TextPart("```repl\nanswer.update(content=str(len(ran)), ready=True)\n```")])

    events = await collect(fake, FunctionModel(respond), rlm_root_protocol="text")
    assert types(events).count("code") == 21
    assert events[-1].type == "final" and events[-1].answer == "19" and events[-1].ready
    feedback = user_prompts(seen[1])[-1]
    assert "[block 20]" in feedback and "[block 21]" not in feedback
    assert feedback.endswith("[blocks 21 to 10000]\n" + prompts.skipped_past_the_cap(20))
    assert len(feedback) < 20_000


async def test_iteration_limit_ends_with_best_answer_not_ready(fake: FakeOpenAI) -> None:
    model = scripted(*[[code(f"answer['content'] = 'draft {i}'")] for i in range(10)])
    events = await collect(fake, model, rlm_max_iterations=3)
    final = events[-1]
    assert final.type == "final" and not final.ready
    assert final.answer == "draft 2" and final.iterations == 3
    assert types(events).count("code") == 3


async def test_per_run_settings_lower_the_limits(fake: FakeOpenAI) -> None:
    model = scripted(*[[code("x = 1")] for _ in range(10)])
    events = await collect(fake, model, run_settings=RunSettings(max_iterations=2))
    assert events[0].limits.max_iterations == 2 and events[-1].iterations == 2


async def test_prose_reply_gets_one_reminder(fake: FakeOpenAI) -> None:
    seen: list[list[ModelMessage]] = []
    model = scripted(
        ["I think the answer is 42."], [code("answer['content'] = '42'\nanswer['ready'] = True")], seen=seen
    )
    events = await collect(fake, model)
    assert events[-1].type == "final" and events[-1].ready and events[-1].answer == "42"
    assert "not marked ready" in user_prompts(seen[-1])[-1]


async def test_a_model_that_never_writes_code_gets_no_answer_and_a_plain_note(fake: FakeOpenAI) -> None:
    """Mutant caught: returning the model's last prose as the answer when no cell ever ran."""
    model = scripted(["Thinking about it."], ["The answer is 42."])
    events = await collect(fake, model)
    final = events[-1]
    assert final.type == "final" and not final.ready and final.answer == ""
    assert final.note and "wrote no code in 2 replies" in final.note and "RLM_ROOT_PROTOCOL=text" in final.note
    assert [e.text for e in events if e.type == "thought"] == ["Thinking about it.", "The answer is 42."]


async def test_prose_after_cells_that_ran_ends_the_run_with_the_best_answer(fake: FakeOpenAI) -> None:
    model = scripted([code("x = 1")], ["Thinking about it."], ["The answer is 42."])
    events = await collect(fake, model)
    final = events[-1]
    assert final.type == "final" and not final.ready and final.answer == "The answer is 42." and final.note is None


async def test_traceback_is_fed_back_to_the_model(fake: FakeOpenAI) -> None:
    seen: list[list[ModelMessage]] = []
    model = scripted([code("ratio = 1 / 0")], [code("answer.update(content='fixed', ready=True)")], seen=seen)
    events = await collect(fake, model)
    output = next(e for e in events if e.type == "output")
    assert "ZeroDivisionError" in output.error
    returned = tool_returns(seen[1])[-1]
    assert "Error:" in returned and "ZeroDivisionError" in returned and '<cell 1>", line 1' in returned


async def test_root_model_never_receives_the_input(fake: FakeOpenAI) -> None:
    seen: list[list[ModelMessage]] = []
    secret = "NEEDLE-IN-THE-HAYSTACK"
    data = "x" * 5000 + secret + "y" * 5000
    model = scripted([code("len(context)")], [code("answer.update(content='ok', ready=True)")], seen=seen)
    await collect(fake, model, input_data=data)
    sent = repr(seen)
    assert secret not in sent
    assert "10,022 characters" in user_prompts(seen[0])[0]


async def test_text_protocol_runs_every_block(fake: FakeOpenAI) -> None:
    seen: list[list[ModelMessage]] = []
    infos: list[AgentInfo] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(list(messages))
        infos.append(info)
        turn = sum(1 for message in messages if isinstance(message, ModelResponse))
        replies = [
            "First a look.\n```repl\nx = len(context)\nprint(x)\n```\nand\n```python\nprint(x * 2)\n```",
            "```repl\nanswer['content'] = f'{x} chars'\nanswer['ready'] = True\n```",
        ]
        return ModelResponse(parts=[TextPart(replies[min(turn, 1)])])

    events = await collect(fake, FunctionModel(respond), input_data="abcd", rlm_root_protocol="text")
    assert types(events) == [
        "start",
        "thought",
        "code",
        "output",
        "code",
        "output",
        "usage",
        "code",
        "output",
        "answer",
        "usage",
        "final",
    ]
    assert events[1].text == "First a look.\n\nand"
    assert events[-1].answer == "4 chars" and events[-1].ready
    assert not infos[0].function_tools
    feedback = user_prompts(seen[1])[-1]
    assert "[block 1]" in feedback and "4\n" in feedback and "[block 2]" in feedback and "8\n" in feedback


async def test_root_http_errors_map_to_error_codes(fake: FakeOpenAI) -> None:
    for status, expected in ((401, "auth"), (403, "auth"), (500, "model_unavailable")):

        def fail(messages: list[ModelMessage], info: AgentInfo, status: int = status) -> ModelResponse:
            raise ModelHTTPError(status, "root-model", {"error": "nope"})

        events = await collect(fake, FunctionModel(fail))
        assert types(events) == ["start", "error"]
        assert events[-1].code == expected


async def test_error_event_carries_the_answer_so_far(fake: FakeOpenAI) -> None:
    calls = 0

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return ModelResponse(parts=[code("answer['content'] = 'partial'")])
        raise ModelHTTPError(502, "root-model", "bad gateway")

    events = await collect(fake, FunctionModel(respond))
    assert events[-1].type == "error" and events[-1].answer == "partial"


def test_code_blocks_are_extracted_with_their_prose() -> None:
    blocks, prose = extract_code_blocks("a\n```repl\n1\n```\nb\n```python\n2\n```\n```js\nno\n```")
    assert blocks == ["1\n", "2\n"]
    assert prose.startswith("a") and "```js" in prose
    blocks, prose = extract_code_blocks("look:\n```python\nprint(1)\n")
    assert blocks == ["print(1)\n"] and prose == "look:"


def test_blocking_helper_returns_the_terminal_event(fake: FakeOpenAI) -> None:
    from rlm_service.engine import run_blocking

    seen: list[str] = []
    model = scripted([code("answer.update(content=context.upper(), ready=True)")])
    final = run_blocking(
        make_settings(fake), "shout", "hello", root_model=model, on_event=lambda e: seen.append(e.type)
    )
    assert final.type == "final" and final.answer == "HELLO"
    assert seen[0] == "start" and seen[-1] == "final"


async def test_the_worker_starts_while_the_root_writes_its_first_cell(fake: FakeOpenAI) -> None:
    """The worker's start and the root's first reply overlap instead of adding up: the first reply is
    written only once the worker has begun to start, and the worker finishes starting only once that reply
    is written. Mutant caught: the REPL started after the first reply (the two wait for each other and the
    run fails)."""
    spawning, replied = asyncio.Event(), asyncio.Event()

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            await asyncio.wait_for(spawning.wait(), 30)
            replied.set()
            return ModelResponse(parts=[code("answer.update(content=str(len(context)), ready=True)")])
        return ModelResponse(parts=[TextPart("done")])

    async with Engine(make_settings(fake), root_model=FunctionModel(respond)) as engine:
        spawn = engine.repls.zygote.spawn

        async def overlapping_spawn(*args: Any, **kwargs: Any) -> Any:
            spawning.set()
            await asyncio.wait_for(replied.wait(), 30)
            return await spawn(*args, **kwargs)

        engine.repls.zygote.spawn = overlapping_spawn  # type: ignore[method-assign]
        events = [event async for event in engine.run("do it", "12345")]
    assert events[-1].type == "final" and events[-1].answer == "5"  # type: ignore[attr-defined]


async def test_a_worker_that_cannot_start_fails_the_run_at_its_first_cell(fake: FakeOpenAI) -> None:
    from rlm_service.repl.spawner import SpawnError

    requests: list[int] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        requests.append(len(messages))
        return ModelResponse(parts=[code("print(1)")])

    async with Engine(make_settings(fake), root_model=FunctionModel(respond)) as engine:

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise SpawnError("the zygote could not fork a worker: out of processes")

        engine.repls.zygote.spawn = broken  # type: ignore[method-assign]
        events = [event async for event in engine.run("do it", "input")]
    assert types(events) == ["start", "error"]
    assert events[-1].code == "internal" and "out of processes" in events[-1].message  # type: ignore[attr-defined]
    assert requests == [1]  # one root request, then the cell found no worker


@pytest.mark.parametrize(
    ("repl", "network", "told"),
    [
        ("subprocess", "off", "the network is not"),
        ("subprocess", "on", "so is the network"),
        ("inprocess", "off", "so is the network"),  # code in the server's own process: nothing keeps it off
    ],
)
async def test_the_root_model_is_told_whether_its_cells_have_the_network(
    fake: FakeOpenAI, repl: str, network: str, told: str
) -> None:
    """Old behaviour caught: "the network is not" available whatever RLM_WORKER_NETWORK and RLM_REPL said, so with
    it on the root model would not fetch what a task pointed it to."""
    done = script({"code": ["answer.update(content='ok', ready=True)"]})
    async with Engine(make_settings(fake, rlm_repl=repl, rlm_worker_network=network)) as engine:
        events = [event async for event in engine.run(done, "input")]
    assert events[-1].type == "final"
    system = fake.stats.root_bodies[0]["messages"][0]
    assert system["role"] == "system" and told in system["content"]


def test_the_system_prompt_teaches_figures_markdown_and_the_method_by_example() -> None:
    """What a weak root model needs most (#20): matplotlib and that open figures reach the user, that the
    answer is Markdown read on its own, and one worked example of look → chunk → batch → verify → ready."""
    from rlm_service.events import RunLimits

    limits = RunLimits(
        max_iterations=20, max_subcalls=1000, exec_timeout_s=300, subcall_concurrency=16, max_output_chars=8192
    )
    for protocol in ("tools", "text"):
        text = prompts.system_prompt(protocol, limits)
        assert "matplotlib" in text and "shown to the user" in text
        assert "rendered as Markdown" in text and "on its own" in text
        example = text[text.index("For example") :]
        steps = ["print(len(context))", "llm_batch(", 'startswith("Error:")', 'answer["ready"] = True']
        assert all(step in example for step in steps)
        assert [example.index(step) for step in steps] == sorted(example.index(step) for step in steps)
        assert len(text) < 4200  # read every turn: keep it short (BENCHMARKS.md, beside B6)


async def test_a_run_that_ends_while_its_workspace_is_being_made_leaves_nothing(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workspace is made in a thread alongside the first model request. Here the model fails while the
    thread is still writing the input: by the run's terminal event the thread has finished and its
    workspace is gone. Mutant: `_Setup.close` removes only a workspace already made → the run directory
    stays."""
    entered, release = threading.Event(), threading.Event()
    write_input = Workspace.write_input

    def gated(self: Workspace, text: str) -> None:
        entered.set()
        release.wait(30)
        write_input(self, text)

    async def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert await asyncio.to_thread(entered.wait, 30)
        threading.Timer(0.2, release.set).start()
        raise ModelHTTPError(500, "root-model", {"error": "nope"})

    monkeypatch.setattr(Workspace, "write_input", gated)
    before = set(instance_directory().iterdir())
    events = await collect(fake, FunctionModel(fail))
    assert types(events) == ["start", "error"] and release.is_set()
    assert set(instance_directory().iterdir()) <= before
