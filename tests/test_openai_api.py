"""The OpenAI-compatible endpoint, with the official `openai` SDK as the client, against the real server."""

from __future__ import annotations

import http.client
import json
import re
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from rlm_service import answers
from rlm_service.events import FinalEvent, RunUsage
from rlm_service.openai_api import ANSWER_DELTA_CHARS, _chunks
from rlm_service.runs import LiveRun
from tests.conftest import LiveServer, SseEvent, make_settings, parse_sse, script, ticks_while_read, wait_until
from tests.fake_openai import FakeOpenAI, HTTPFault, _first_user_text

TOKEN = "rlm-test-token"
SCHEMA = {
    "type": "object",
    "properties": {"lines": {"type": "integer"}, "first": {"type": "string"}},
    "required": ["lines", "first"],
    "additionalProperties": False,
}


def task_script_root(messages: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    """The root model's turns from the script in the task (not from the input's preview, which holds the
    conversation and so the script again)."""
    turn = sum(1 for message in messages if message.get("role") == "assistant")
    task = _first_user_text(messages).split("\n\nThe input is in `context`")[0]
    match = re.search(r"<<<SCRIPT\s*(.*)\s*SCRIPT>>>", task, re.DOTALL)
    turns = json.loads(match.group(1)) if match else []
    return turns[turn] if turn < len(turns) else {"text": "Nothing more to do.", "code": []}


@pytest.fixture
def model() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(root_model="root-model", root=task_script_root).start()
    yield server
    server.stop()


@pytest.fixture
def server(model: FakeOpenAI) -> Iterator[LiveServer]:
    with LiveServer(make_settings(model, rlm_api_token=TOKEN), ping_s=0.5) as live:
        yield live


def client(server: LiveServer, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def run_events(server: LiveServer, completion_id: str) -> list[SseEvent]:
    """The events of the run behind a completion (its id is `chatcmpl-<run id>`)."""
    run_id = completion_id.removeprefix("chatcmpl-")
    response = httpx2.get(
        f"{server.url}/api/runs/{run_id}/events", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert response.status_code == 200
    return list(parse_sse(iter(response.text.splitlines())))


COUNT_AND_ASK = script(
    {
        "text": "I count the lines and ask the sub-model.",
        "code": ["n = len(context.splitlines())\nnotes = llm_batch(['summarize: ' + context[:50]] * 2)\nprint(n)"],
    },
    {"code": ["answer.update(content=f'{n} lines', ready=True)"]},
)


def test_a_chat_completion_is_the_runs_answer_with_root_and_sub_tokens(server: LiveServer) -> None:
    """The conversation is the input, the last user message the task; usage adds root and sub tokens.
    Mutant caught: usage counting the root model only (the sub-model's tokens are not zero here)."""
    reply = client(server).chat.completions.create(
        model="rlm",
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": COUNT_AND_ASK}],
    )
    choice = reply.choices[0]
    # system header, its line, user header, the script's line
    assert choice.message.content == "4 lines" and choice.finish_reason == "stop"
    final = run_events(server, reply.id)[-1]
    assert final.event == "final"
    usage = final.data["usage"]
    assert usage["sub"]["input_tokens"] > 0
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == usage["root"]["input_tokens"] + usage["sub"]["input_tokens"]
    assert reply.usage.completion_tokens == usage["root"]["output_tokens"] + usage["sub"]["output_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_sampling_parameters_reach_the_root_model_only_and_unknown_ones_are_ignored(
    server: LiveServer, model: FakeOpenAI
) -> None:
    """Mutant caught: `model_settings` not passed to `agent.iter` (the root requests carry no temperature)."""
    client(server).chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": COUNT_AND_ASK}],
        temperature=0.25,
        top_p=0.5,
        max_tokens=777,
        seed=11,
        user="someone",
        extra_body={"no_such_parameter": True},
    )
    assert model.stats.root_bodies
    for body in model.stats.root_bodies:
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.25, 0.5, 777, 11)
    assert model.stats.sub_requests == 2


def test_a_run_ended_by_its_limits_finishes_with_length(model: FakeOpenAI) -> None:
    never_ready = script(
        {"code": ["answer['content'] = 'partial'"]},
        {"code": ["print('still working')"]},
        {"code": ["print('and more')"]},
    )
    with LiveServer(make_settings(model, rlm_max_iterations=2)) as live:
        reply = client(live, "anything").chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": never_ready}]
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "partial"


def test_streaming_sends_progress_as_reasoning_then_the_answer_then_done(server: LiveServer) -> None:
    stream = client(server).chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": COUNT_AND_ASK}],
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, finishes, usage = [], [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == "rlm"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content"):
                assert not content, "progress came after the answer had started"
                reasoning.append(delta["reasoning_content"])
            if choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    progress = "".join(reasoning)
    assert "I count the lines and ask the sub-model." in progress
    assert "n = len(context.splitlines())" in progress  # the cell
    assert "sub-calls: 2/2 done" in progress
    assert "```text\n2\n```" in progress  # the cell's output
    assert "".join(content) == "2 lines" and finishes == ["stop"]
    assert usage is not None and usage.total_tokens > 0


def test_the_stream_ends_with_done_on_the_wire(server: LiveServer) -> None:
    with httpx2.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": "rlm", "stream": True, "messages": [{"role": "user", "content": COUNT_AND_ASK}]},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"


def test_structured_output_returns_schema_valid_json(server: LiveServer) -> None:
    valid = script(
        {
            "code": [
                "import json\nrows = context.splitlines()\n"
                "answer.update(content=json.dumps({'lines': len(rows), 'first': rows[0]}), ready=True)"
            ]
        }
    )
    reply = client(server).chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": valid}],
        response_format={"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA, "strict": True}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"lines": 2, "first": "--- user ---"}
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_asks_for_a_json_object_and_starts_no_schema_check(
    server: LiveServer, model: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`response_format: json_object`: an answer that is not a JSON object is refused until the root gives one. Its
    schema is ours, so no process checks it (mutant caught: `SCHEMA_CHECKED` not passed, one schema check)."""
    checks: list[dict[str, Any]] = []
    real = answers._in_child
    monkeypatch.setattr(answers, "_in_child", lambda request, timeout: checks.append(request) or real(request, timeout))
    prompt = script(
        {"code": ["answer.update(content='[1, 2]', ready=True)"]},
        {"code": ["answer.update(content='{\"n\": 2}', ready=True)"]},
    )
    reply = client(server).chat.completions.create(
        model="rlm", messages=[{"role": "user", "content": prompt}], response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"n": 2}
    assert "[1, 2] is not of type 'object'" in model.stats.root_bodies[1]["messages"][-1]["content"]
    assert [check["content"] for check in checks] == ["[1, 2]", '{"n": 2}']  # (the answers' checks only)


def test_an_answer_that_violates_the_schema_is_refused_until_the_root_fixes_it(
    server: LiveServer, model: FakeOpenAI
) -> None:
    """The first cell marks ready an answer whose `lines` is a string: the run goes on, the root model
    reads exactly what is wrong, and its second cell's valid answer is the reply.
    Mutant caught: the controller not consulting the schema (the invalid answer is the reply)."""
    fixes = script(
        {"code": ["import json\nanswer.update(content=json.dumps({'lines': 'two', 'first': 'x'}), ready=True)"]},
        {"code": ["print(answer['ready'])\nanswer.update(content=json.dumps({'lines': 2, 'first': 'x'}), ready=True)"]},
    )
    reply = client(server).chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": fixes}],
        response_format={"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"lines": 2, "first": "x"}
    told = model.stats.root_bodies[1]["messages"][-1]["content"]
    assert "answer not accepted" in told and "at $.lines: 'two' is not of type 'integer'" in told
    outputs = [event.data["stdout"] for event in run_events(server, reply.id) if event.event == "output"]
    assert outputs[1] == "False\n"  # ready really was set back in the REPL
    schema_told = model.stats.root_bodies[0]["messages"][1]["content"]
    assert '"required": ["lines", "first"]' in schema_told


def test_refusals_come_in_openais_error_shape(server: LiveServer) -> None:
    """Bad key 401, n > 1 400, unknown model 404, invalid schema 422: each an `openai` SDK exception with
    the error's code. Mutant caught: `n` not checked (the run starts and answers)."""
    messages: Any = [{"role": "user", "content": COUNT_AND_ASK}]
    with pytest.raises(openai.AuthenticationError) as bad_key:
        client(server, "wrong").chat.completions.create(model="rlm", messages=messages)
    assert bad_key.value.code == "invalid_api_key" and "RLM_API_TOKEN" in bad_key.value.message
    with pytest.raises(openai.BadRequestError) as two:
        client(server).chat.completions.create(model="rlm", messages=messages, n=2)
    assert two.value.param == "n" and "n = 2" in two.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client(server).chat.completions.create(model="gpt-4o", messages=messages)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as schema:
        client(server).chat.completions.create(
            model="rlm",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        )
    assert "not a valid JSON Schema" in schema.value.message
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(300):
        deep = {"not": deep}
    with pytest.raises(openai.UnprocessableEntityError) as too_deep:  # old: a bare 500, not in OpenAI's shape
        client(server).chat.completions.create(
            model="rlm",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": deep}},
        )
    assert "nested too deeply" in too_deep.value.message
    with pytest.raises(openai.UnprocessableEntityError) as looped:  # old (the attack pass): no answer could pass
        client(server).chat.completions.create(
            model="rlm",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
        )
    assert "refers back to itself at $" in looped.value.message
    with pytest.raises(openai.UnprocessableEntityError) as long_schema:
        client(server).chat.completions.create(
            model="rlm",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"title": "x" * 100_000}}},
        )
    assert long_schema.value.param == "response_format"
    assert "100,013 characters of JSON, more than RLM_MAX_PROMPT_CHARS (100,000)" in long_schema.value.message
    with pytest.raises(openai.BadRequestError) as no_schema:  # old (the attack pass): run with any JSON answer
        client(server).chat.completions.create(model="rlm", messages=messages, response_format={"type": "json_schema"})
    assert no_schema.value.param == "response_format" and "needs json_schema" in no_schema.value.message
    with pytest.raises(openai.BadRequestError) as no_task:
        client(server).chat.completions.create(model="rlm", messages=[{"role": "system", "content": "hi"}])
    assert "no user message" in no_task.value.message
    with pytest.raises(openai.BadRequestError) as image:
        client(server).chat.completions.create(
            model="rlm",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
        )
    assert "only text content" in image.value.message
    with pytest.raises(openai.BadRequestError) as textless:  # old: "only text content is supported, not a 'text' part"
        client(server).chat.completions.create(model="rlm", messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert "messages[0]: a 'text' part without its 'text' string" in textless.value.message
    with pytest.raises(openai.BadRequestError) as yes:  # old: streamed, "yes" taken for true
        client(server).chat.completions.create(model="rlm", messages=messages, extra_body={"stream": "yes"})
    assert "stream: Input should be a valid boolean" in yes.value.message
    with pytest.raises(openai.BadRequestError) as unstreamed:  # old: accepted, the options ignored
        client(server).chat.completions.create(model="rlm", messages=messages, stream_options={"include_usage": True})
    assert unstreamed.value.param == "stream_options" and "stream: true" in unstreamed.value.message
    for huge in ({"max_tokens": 10**23}, {"seed": 2**64}):  # old: accepted, the run failed at its first request
        with pytest.raises(openai.BadRequestError) as too_large:
            client(server).chat.completions.create(model="rlm", messages=messages, extra_body=huge)
        assert f"{next(iter(huge))}: Input should be less than or equal to" in too_large.value.message
    assert [m.id for m in client(server).models.list()] == ["rlm"]


def test_endpoints_this_service_does_not_serve_answer_in_openais_error_shape(server: LiveServer) -> None:
    """An OpenAI client calling an endpoint the service does not have (embeddings, the legacy completions) gets
    a 404 it can read, naming what is served; a wrong method on a served path a 405 in the same shape, with
    `Allow`. Old code: FastAPI's `{"detail": "Not Found"}`, which the SDK shows as a bare status."""
    with pytest.raises(openai.NotFoundError) as embeddings:
        client(server).embeddings.create(model="rlm", input="hello")
    assert embeddings.value.code == "not_found" and embeddings.value.type == "invalid_request_error"
    assert "/v1/embeddings" in embeddings.value.message and "/v1/chat/completions" in embeddings.value.message
    with pytest.raises(openai.NotFoundError) as legacy:
        client(server).completions.create(model="rlm", prompt="hello")
    assert "/v1/completions" in legacy.value.message
    wrong = httpx2.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed" and "POST" in wrong.json()["error"]["message"]
    outside = httpx2.get(f"{server.url}/api/nothing-here", headers={"Authorization": f"Bearer {TOKEN}"})
    assert outside.status_code == 404 and outside.json() == {"detail": "Not Found"}  # the rest of the API as before


def test_a_run_that_fails_after_the_request_started_is_a_500_with_the_runs_error_code(
    server: LiveServer, model: FakeOpenAI
) -> None:
    """A failed run is not started again by the client: OpenAI's clients retry a 500 twice by default, which
    here would run the whole task three times (old behaviour: three root requests for a run whose model refused
    the key); the service retried its model calls already, within the run."""
    model.root = lambda messages, body: (_ for _ in ()).throw(HTTPFault(503, "overloaded"))
    with pytest.raises(openai.InternalServerError) as failed:
        client(server).chat.completions.create(model="rlm", messages=[{"role": "user", "content": "hello"}])
    assert failed.value.status_code == 500 and failed.value.code == "model_unavailable"
    assert failed.value.response.headers["x-should-retry"] == "false"
    model.root = lambda messages, body: (_ for _ in ()).throw(HTTPFault(401, "wrong key"))
    before = model.stats.root_requests
    retrying = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=2, timeout=60)
    with pytest.raises(openai.InternalServerError) as refused:
        retrying.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "hello"}])
    assert refused.value.code == "auth" and model.stats.root_requests - before == 1


def test_no_model_configured_is_503_and_a_full_server_429(model: FakeOpenAI) -> None:
    with (
        LiveServer(make_settings(model, openai_model_name=None, openai_sub_model_name=None)) as live,
        pytest.raises(openai.InternalServerError) as unconfigured,
    ):
        client(live).chat.completions.create(model="rlm", messages=[{"role": "user", "content": "hi"}])
    assert unconfigured.value.status_code == 503 and "OPENAI_MODEL_NAME" in unconfigured.value.message
    slow = script({"code": ["import time\ntime.sleep(20)"]})
    with LiveServer(make_settings(model, rlm_max_concurrent_runs=1)) as live:
        busy = client(live).chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": slow}], stream=True
        )
        next(iter(busy))
        with pytest.raises(openai.RateLimitError):
            client(live).chat.completions.create(model="rlm", messages=[{"role": "user", "content": "hi"}])
        busy.close()


SLEEPS = script(
    {"text": "Waiting a long time.", "code": ["import time\ntime.sleep(60)"]},
    {"code": ["answer.update(content='too late', ready=True)"]},
)


def terminal_of(server: LiveServer, run_id: str) -> SseEvent | None:
    response = httpx2.get(
        f"{server.url}/api/runs/{run_id}/events",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
        params={"after": 0},
    )
    events = list(parse_sse(iter(response.text.splitlines()))) if response.status_code == 200 else []
    return events[-1] if events and events[-1].event in ("final", "error") else None


def test_a_client_that_closes_the_stream_cancels_the_run(server: LiveServer, model: FakeOpenAI) -> None:
    """Mutant caught: the stream's `finally` not cancelling the run (it sleeps on, then asks the root again)."""
    stream = client(server).chat.completions.create(
        model="rlm", messages=[{"role": "user", "content": SLEEPS}], stream=True
    )
    run_id = ""
    for chunk in stream:
        run_id = chunk.id.removeprefix("chatcmpl-")
        if "time.sleep(60)" in str(chunk.choices[0].delta.model_dump().get("reasoning_content")):
            break
    stream.close()
    assert wait_until(lambda: terminal_of(server, run_id) is not None, timeout=15)
    terminal = terminal_of(server, run_id)
    assert terminal is not None and terminal.event == "error" and terminal.data["code"] == "cancelled"
    assert model.stats.root_requests == 1


def test_a_client_that_gives_up_on_a_non_streaming_request_cancels_the_run(
    server: LiveServer, model: FakeOpenAI
) -> None:
    """Mutant caught: `_complete` waiting for the run without watching for the client leaving."""
    engine_runs = server.app.state.engine.runs
    outcome: list[BaseException] = []

    def request() -> None:
        try:
            client(server).with_options(timeout=3).chat.completions.create(
                model="rlm", messages=[{"role": "user", "content": SLEEPS}]
            )
        except BaseException as exc:  # the timeout this test expects, kept for the assertion below
            outcome.append(exc)

    caller = threading.Thread(target=request)
    caller.start()
    assert wait_until(lambda: bool(engine_runs.live()), timeout=10)
    run = engine_runs.live()[0]
    caller.join(30)
    assert outcome and isinstance(outcome[0], openai.APITimeoutError)
    assert wait_until(lambda: run.ended, timeout=15), "the run went on after its client left"
    terminal = run.events[-1]
    assert terminal.type == "error" and terminal.code == "cancelled"
    assert model.stats.root_requests == 1


def test_a_long_conversation_is_served_and_its_wrong_message_named(server: LiveServer) -> None:
    """Conversations past 1,000 messages are validated a message at a time: one of 3,000 is served, and a
    wrong message among them is named by its place. Mutant caught: the place left out of the refusal
    (`within` not passed: the error says `role`, not `messages.2998.role`)."""
    history: Any = [{"role": "user" if n % 2 else "assistant", "content": f"line {n}"} for n in range(2999)]
    task = script({"code": ["answer.update(content=str(('line ' + '2998') in context), ready=True)"]})
    reply = client(server).chat.completions.create(model="rlm", messages=[*history, {"role": "user", "content": task}])
    assert reply.choices[0].message.content == "True"
    with pytest.raises(openai.BadRequestError) as wrong:
        client(server).chat.completions.create(model="rlm", messages=[*history[:-1], {"role": "robot"}, *history[-1:]])
    assert wrong.value.param == "messages.2998.role" and "messages.2998.role: Input should be" in wrong.value.message


def test_an_assistants_refusal_in_the_conversation_is_part_of_the_input(server: LiveServer) -> None:
    """OpenAI's assistant messages hold text parts and refusal parts; a client replaying a conversation in which
    the assistant refused was answered 400 ("only text content is supported, not a 'refusal' part"). The
    refusal is the assistant's text in the input. Mutant: `message_text` reading text parts only."""
    task = script({"code": ["answer.update(content=str('I will not' in context), ready=True)"]})
    reply = client(server).chat.completions.create(
        model="rlm",
        messages=[
            {"role": "user", "content": "Do something bad."},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I will not"}]},
            {"role": "user", "content": task},
        ],
    )
    assert reply.choices[0].message.content == "True"


async def test_a_long_answer_streams_while_the_server_serves_others() -> None:
    """A 4-million-character answer goes out in 4,000 deltas to a client that reads fast, so sending never waits:
    made in one go, they held `/health` for 246 ms. The stream passes through the event loop after each delta.
    Mutant caught: no `await asyncio.sleep(0)` in the answer's loop in `openai_api._chunks` (every delta is then
    read at the same count)."""
    run = LiveRun("r")
    run.emit(
        FinalEvent(
            run_id="r", answer="a" * 50 * ANSWER_DELTA_CHARS, ready=True, iterations=1, usage=RunUsage(), elapsed_ms=1
        )
    )
    read = await ticks_while_read(_chunks(run, include_usage=False))
    deltas = [count for chunk, count in read if '"content":"a' in str(chunk.data)]
    assert len(deltas) == 50 and len(set(deltas)) == 50, deltas


def test_waiting_non_streamed_requests_do_not_hold_their_conversation(model: FakeOpenAI) -> None:
    """Two non-streamed requests, each with a 24 MiB message, wait on the root model at once: the server holds
    each conversation once (the run's input), not twice. Counted by `tracemalloc` (the server runs in this
    process): what Python holds, not resident memory, which the allocator keeps past a free on a busy machine.
    The requests are sent from bytes made before tracing began, so that only the server's copies count.
    Old code caught: the request kept its parsed conversation until its run ended, one more copy of each
    message (2.0 times their size or more)."""
    requests, size = 2, 24 * 2**20
    task = script({"code": ["answer.update(content=str(len(context)), ready=True)"]})
    messages = [
        {"role": "user", "content": "x" * size},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": task},
    ]
    body = json.dumps({"model": "rlm", "messages": messages}).encode()
    del messages
    answers: list[str] = []

    def ask(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        reply = connection.getresponse()
        answers.append(json.loads(reply.read())["choices"][0]["message"]["content"])
        connection.close()

    with LiveServer(make_settings(model, rlm_api_token=TOKEN)) as live:
        ask(live.port)  # the first run builds what later runs reuse: not part of what is counted
        model.inject("hold", role="root", count=requests)
        callers = [threading.Thread(target=ask, args=(live.port,)) for _ in range(requests)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for caller in callers:
                caller.start()
            assert wait_until(lambda: model.stats.held == requests, timeout=60)  # every run waits on the model
            # the conversations are read, rendered and copied into the runs' workspaces meanwhile: wait until
            # what is left is what the waiting requests and their runs hold
            bound = 1.5 * requests * size
            held = wait_until(lambda: tracemalloc.get_traced_memory()[0] - before < bound, timeout=30)
            growth = (tracemalloc.get_traced_memory()[0] - before) / (requests * size)
        finally:
            tracemalloc.stop()
            model.release()
            for caller in callers:
                caller.join(120)
        assert held, f"the server holds {growth:.2f} times the messages"
    assert len(answers) == requests + 1 and int(answers[-1]) > size


def test_a_run_without_code_says_why_it_has_no_answer(server: LiveServer) -> None:
    """A root model that writes no code (as a small local model often does): the run's final has no answer and a
    note saying why, which /process and MCP show. An OpenAI client got an empty content and nothing else; the note
    is now the message's `reasoning_content`, and the stream's last reasoning delta."""
    messages: Any = [{"role": "user", "content": "Say hello."}]
    reply = client(server).chat.completions.create(model="rlm", messages=messages)
    message = reply.choices[0].message
    assert message.content == "" and reply.choices[0].finish_reason == "length"
    assert (message.model_extra or {}).get("reasoning_content", "").startswith("Note: The root model wrote no code")
    reasoning = [
        (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for chunk in client(server).chat.completions.create(model="rlm", messages=messages, stream=True)
        if chunk.choices
    ]
    assert "Note: The root model wrote no code" in reasoning[-2], reasoning[-3:]
