"""Typed answers on `POST /process`: `settings.answer_schema`, the check before `ready`, `final.answer_json`."""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest

from rlm_service import answers
from rlm_service import engine as engine_module
from rlm_service.answers import CHECK_TIMEOUT_S, AnswerSchema, check_schema
from tests.conftest import (
    LiveServer,
    every_call,
    held_until_health_answers,
    make_settings,
    parse_sse,
    post_process,
    script,
    spawn_server,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI

DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT2019 = "https://json-schema.org/draft/2019-09/schema"
SCHEMA = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0}}, "required": ["count"]}


def test_final_carries_the_parsed_answer_when_it_satisfies_the_schema(live: LiveServer) -> None:
    prompt = script({"code": ["import json\nanswer.update(content=json.dumps({'count': len(context)}), ready=True)"]})
    response, events = stream_run(
        live.url, json_body={"prompt": prompt, "input_data": "abc", "settings": {"answer_schema": SCHEMA}}
    )
    assert response.status_code == 200
    final = events[-1]
    assert final.event == "final" and final.data["ready"] is True
    assert final.data["answer_json"] == {"count": 3}


def test_a_dict_put_in_the_answer_becomes_json_text(live: LiveServer) -> None:
    """The root model sets `answer['content']` to a dict rather than to `json.dumps` of it: the answer is that
    dict's JSON, and satisfies the schema. Old behaviour caught: Python's repr, `{'count': 3}`, was the answer,
    refused as not JSON (and shown as such to clients without a schema)."""
    prompt = script({"code": ["answer.update(content={'count': len(context), 'note': 'é'}, ready=True)"]})
    _, events = stream_run(
        live.url, json_body={"prompt": prompt, "input_data": "abc", "settings": {"answer_schema": SCHEMA}}
    )
    final = events[-1]
    assert final.event == "final" and final.data["ready"] is True
    assert final.data["answer"] == '{"count": 3, "note": "é"}'
    assert final.data["answer_json"] == {"count": 3, "note": "é"}


def test_an_escaped_lone_surrogate_in_the_answer_reaches_the_client_and_the_history(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An answer whose JSON escapes a lone surrogate (`"\\ud800"`: plain ASCII text until it is parsed) gets
    U+FFFD in `answer_json`. Old behaviour caught (the review): the parsed value could not be encoded, the stream
    broke at the `final` event and the history's writer failed on it."""
    prompt = script({"code": ['answer.update(content=\'{"a": "x\\\\ud800"}\', ready=True)']})
    settings = make_settings(fake, rlm_history_db=str(tmp_path / "history.db"))
    with LiveServer(settings) as live:
        _, events = stream_run(
            live.url, json_body={"prompt": prompt, "settings": {"answer_schema": {"type": "object"}}}
        )
        assert events[-1].event == "final" and events[-1].data["answer_json"] == {"a": "x\ufffd"}
        stored = f"{live.url}/api/runs/{events[0].data['run_id']}"

        def final_stored() -> bool:
            found = httpx2.get(stored, timeout=30).json().get("events") or [{}]
            return bool(found[-1].get("answer_json") == {"a": "x\ufffd"})

        assert wait_until(final_stored, timeout=30)


def test_an_answer_that_is_not_json_is_never_accepted_and_the_root_reads_why(fake: FakeOpenAI) -> None:
    """Mutant caught: the controller not consulting the schema (the run ends ready after the first cell)."""
    prompt = script(
        {"code": ["answer.update(content='three', ready=True)"]},
        {"code": ["answer.update(content='{\"count\": -1}', ready=True)"]},
        {"code": ["print(answer)"]},
    )
    with LiveServer(make_settings(fake, rlm_max_iterations=3)) as live:
        _, events = stream_run(live.url, json_body={"prompt": prompt, "settings": {"answer_schema": SCHEMA}})
    final = events[-1]
    assert final.event == "final" and final.data["ready"] is False and final.data["answer_json"] is None
    assert [e.data["ready"] for e in events if e.event == "answer"] == [False, False]
    first, second = (body["messages"][-1]["content"] for body in fake.stats.root_bodies[1:3])
    assert "answer['content'] is not valid JSON" in first and "json.dumps" in first
    assert "at $.count: -1 is less than the minimum of 0" in second


def test_a_schema_that_is_not_a_json_schema_is_refused_before_the_run_starts(
    live: LiveServer, fake: FakeOpenAI
) -> None:
    """Mutants caught: `RunSettings` not checking the schema (the run starts and the fake model is asked); no
    cap on the schema's objects (the wide schema is refused for its size, after the check, a different message)."""
    response = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": {"type": 5}}})
    assert response.status_code == 422
    assert "settings.answer_schema: not a valid JSON Schema" in response.json()["detail"]
    deep: dict[str, object] = {"type": "integer"}
    for _ in range(300):  # old behaviour (the attack pass): the check's RecursionError, a bare 500
        deep = {"not": deep}
    too_deep = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": deep}})
    assert too_deep.status_code == 422 and "nested too deeply" in too_deep.json()["detail"], too_deep.text
    # old behaviour (the attack pass): 48,000 properties checked one by one, 16 s of CPU before the refusal
    wide = {"type": "object", "properties": {f"p{i}": {} for i in range(48_000)}}
    too_wide = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": wide}})
    assert too_wide.status_code == 422, too_wide.text
    assert "a JSON Schema of more than 1,000 objects" in too_wide.json()["detail"]
    nested: object = 1
    for _ in range(260):  # old behaviour (the attack pass): accepted, then every listing of the history was a 500
        nested = [nested]
    deep_const = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": {"const": nested}}})
    assert deep_const.status_code == 422 and "nested too deeply" in deep_const.json()["detail"], deep_const.text
    assert fake.stats.requests == 0


def _loop_at_run_time(reference: str) -> dict[str, Any]:
    """A schema whose `x` refers to `#n` (with `reference`), a dynamic anchor: through `p`, where the walk meets `x`
    first, `#n` is `a`; through `allOf`, it is `b`, and `b` applies `x` in place: a loop only at run time."""
    return {
        "$id": "http://e.com/r",
        "properties": {"p": {"$ref": "http://e.com/a"}},
        "allOf": [{"$ref": "http://e.com/b"}],
        "$defs": {
            "x": {"$id": "http://e.com/x", "$defs": {"d": {"$dynamicAnchor": "n"}}, reference: "#n"},
            "a": {"$id": "http://e.com/a", "$dynamicAnchor": "n", "properties": {"q": {"$ref": "http://e.com/x"}}},
            "b": {"$id": "http://e.com/b", "$dynamicAnchor": "n", "allOf": [{"$ref": "http://e.com/x"}]},
        },
    }


def test_a_schema_no_answer_could_satisfy_is_refused_and_its_references_stay_inside(
    live: LiveServer, fake: FakeOpenAI
) -> None:
    """Old behaviour caught (the attack pass): `"$schema": 5` crashed the checking process, and the refusal blamed
    memory and patterns; a `$ref` looping back without going into the value, or one that resolves nowhere, was
    accepted, and then every answer's check failed; a reference to an http address was fetched by the server
    (jsonschema's default registry), once for every answer checked. Recursion through the value's items is fine."""
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_error(404)

        def log_message(self, format: str, *args: Any) -> None:  # (quiet)
            pass

    remote = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{remote.server_address[1]}/schema.json"
    refused = {
        "$schema must be a string, the URI of a draft (at $.$schema)": {"$schema": 5},
        "it refers back to itself at $ without going into": {"$ref": "#"},
        "it refers back to itself at $.properties.a without": {"properties": {"a": {"$ref": "#/properties/a"}}},
        "refers back to itself at $.$ref": {
            "$ref": "#/$defs/a",
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}},
        },
        "its reference '#/$defs/none' (at $.items.$ref) cannot be resolved": {"items": {"$ref": "#/$defs/none"}},
        f"its reference '{address}' (at $.$ref) cannot be resolved": {"$ref": address},
        # the review of the above: what each draft applies in place, references resolved at run time, and the
        # shapes of draft 4 that its metaschema lets through and every answer's check then failed on
        "a $ref must be a string (at $.$ref)": {"$schema": DRAFT4, "allOf": [{"$ref": "#"}], "$ref": None},
        "patternProperties['('] at $ is not a regular expression": {"$schema": DRAFT4, "patternProperties": {"(": {}}},
        "draft 3 of JSON Schema is not supported": {"$schema": "http://json-schema.org/draft-03/schema#"},
        "refers back to itself at $ without": {"$schema": DRAFT2019, "allOf": [{"$recursiveRef": "#/$defs/x"}]},
        "its reference '#nope' (at $.items.$dynamicRef) cannot be resolved": {"items": {"$dynamicRef": "#nope"}},
        "from $, 203 references and keywords that apply to the value itself follow each other, more than the 100": {
            "$ref": "#/$defs/0",
            "$defs": {str(i): {"allOf": [{"$ref": f"#/$defs/{i + 1}"}]} for i in range(101)} | {"101": {}},
        },
        "refers back to itself at $.allOf[0].$ref without": _loop_at_run_time("$dynamicRef"),
        "it refers back to itself at $.allOf[0].$ref without": _loop_at_run_time("$ref"),  # (resolved at run time too)
    }
    try:
        for reason, schema in refused.items():
            response = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": schema}})
            assert response.status_code == 422 and reason in response.json()["detail"], (schema, response.text)
        assert AnswerSchema({"$ref": address}).problem("1") is not None  # (a schema another replica checked)
    finally:
        remote.shutdown()
    assert hits == [] and fake.stats.requests == 0
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]}
    prompt = script({"code": ['answer.update(content=\'{"kids": [{"kids": []}]}\', ready=True)']})
    _, events = stream_run(live.url, json_body={"prompt": prompt, "settings": {"answer_schema": tree}})
    assert events[-1].event == "final" and events[-1].data["answer_json"] == {"kids": [{"kids": []}]}


ACCEPTED = [  # (schema, an answer it accepts, one it refuses): references of each kind, in the drafts that have them
    (
        {
            "$schema": DRAFT4,
            "id": "http://e.com/r",
            "definitions": {"a": {"id": "#n", "type": "integer"}},
            "items": {"$ref": "#n"},
        },
        [1],
        ["1"],
    ),
    (
        {
            "$schema": "HTTP://json-schema.org/draft-07/schema#",
            "definitions": {"a": {"$id": "#n", "type": "integer"}},
            "items": {"$ref": "#n"},
        },
        [1],
        ["1"],
    ),
    (
        {
            "$schema": DRAFT4,
            "$ref": "#/definitions/n",
            "definitions": {"n": {"type": "integer"}},
            "allOf": [{"$ref": "#"}],
        },
        1,
        "1",
    ),
    (
        {
            "$schema": DRAFT2019,
            "$recursiveAnchor": True,
            "type": "object",
            "properties": {"kids": {"items": {"$recursiveRef": "#"}}},
        },
        {"kids": [{"kids": []}]},
        {"kids": [1]},
    ),
    (
        {"$dynamicAnchor": "node", "type": "object", "properties": {"kids": {"items": {"$dynamicRef": "#node"}}}},
        {"kids": [{}]},
        {"kids": [1]},
    ),
    (
        {
            "$defs": {"a b": {"type": "string"}, "c/d": {"type": "integer"}},
            "prefixItems": [{"$ref": "#/$defs/a%20b"}, {"$ref": "#/$defs/c~1d"}],
        },
        ["x", 1],
        ["x", "1"],
    ),
    (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                }
            },
            "$ref": "#/$defs/node",
        },
        {"next": {"next": None}},
        {"next": 1},
    ),
    ({"items": {"$ref": "https://json-schema.org/draft/2020-12/schema"}}, [{"type": "string"}], [{"type": 5}]),
    (  # a `$dynamicRef` that lands on a plain `$anchor` is a plain reference
        {
            "$id": "https://e.com/root",
            "$dynamicAnchor": "base",
            "allOf": [{"$ref": "lib#/$defs/use"}],
            "$defs": {
                "lib": {
                    "$id": "https://e.com/lib",
                    "$defs": {"use": {"$dynamicRef": "#base"}, "b": {"$anchor": "base", "type": "object"}},
                }
            },
        },
        {},
        1,
    ),
    (  # a `$recursiveRef` in a resource without `$recursiveAnchor` stays in it
        {
            "$schema": DRAFT2019,
            "$id": "https://e.com/root",
            "$recursiveAnchor": True,
            "allOf": [{"$ref": "x#/$defs/d"}],
            "$defs": {
                "x": {
                    "$id": "https://e.com/x",
                    "type": "object",
                    "properties": {"next": {"$ref": "#/$defs/d"}},
                    "$defs": {"d": {"$recursiveRef": "#"}},
                }
            },
        },
        {"next": {"next": {}}},
        {"next": 1},
    ),
]


@pytest.mark.parametrize("schema, good, bad", ACCEPTED)
def test_a_schema_whose_references_resolve_is_accepted_and_checks_answers(
    schema: dict[str, Any], good: Any, bad: Any
) -> None:
    """Valid schemas of each draft that the references' walk must not refuse, each then checking answers as
    jsonschema does. Old behaviour caught (the review of the walk): the walk took its rules from the `$schema` as
    written (the second, a draft 7 in capitals, was refused), followed `$ref`'s siblings in draft 4 (the third)."""
    check_schema(schema)
    answer = AnswerSchema(schema)
    assert answer.problem(json.dumps(good)) is None
    assert (answer.problem(json.dumps(bad)) or "").startswith("the JSON does not satisfy the schema")


def test_schemas_too_large_or_too_slow_to_check_are_refused(
    live: LiveServer, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metaschema asks some arrays for unique items, compared pair by pair when their types mix, and compiles
    every `pattern`: a schema past the caps is refused before its check, and one whose check takes too long, at
    the check's time limit, while the server goes on serving. Old behaviour caught (the review): a `type` of 4,000
    mixed items took 3.6 s of CPU in a server thread; a `pattern` of 1,500 case-insensitive character classes, some
    10 s (every one the check compiles)."""
    mixed = [i if i % 2 else str(i) for i in range(4000)]
    long_array = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": {"type": mixed}}})
    assert long_array.status_code == 422, long_array.text
    assert "a JSON Schema with an array of 4,000 items, more than the 1,000 allowed" in long_array.json()["detail"]
    many = {"properties": {f"p{i}": {"enum": mixed[:990]} for i in range(11)}}
    many_values = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": many}})
    assert many_values.status_code == 422, many_values.text
    assert "a JSON Schema of more than 10,000 values" in many_values.json()["detail"]
    monkeypatch.setattr(answers, "SCHEMA_CHECK_TIMEOUT_S", 1.0)
    slow = {"type": "string", "pattern": "(?i)" + "[\\0-\\U0010ffff]" * 1500}
    with ThreadPoolExecutor(1) as pool:
        refusal = pool.submit(post_process, live.url, json={"prompt": "count", "settings": {"answer_schema": slow}})
        assert httpx2.get(f"{live.url}/health", timeout=5).status_code == 200  # (the check waits in a thread)
        too_slow = refusal.result()
    assert too_slow.status_code == 422, too_slow.text
    assert "the JSON Schema could not be checked within 1 s" in too_slow.json()["detail"]
    assert fake.stats.requests == 0


@pytest.mark.parametrize("body", ["large JSON", "form"])
def test_a_schema_is_checked_once_and_off_the_event_loop(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    """The schema is checked once per request (a process, up to seconds), from a thread, also when the body is
    large enough to be parsed by a child process, or is a form. Mutants caught: the large body's settings, or the
    form's, validated on the event loop (the health check times out); the engine checking the schema again as it
    launches the run (two checks)."""
    checks: list[object] = []
    real = engine_module.check_schema
    monkeypatch.setattr(
        engine_module, "check_schema", lambda schema, max_chars: checks.append(schema) or real(schema, max_chars)
    )
    prompt = script({"code": ["answer.update(content='{\"count\": 2}', ready=True)"]})
    request: dict[str, Any] = (
        {"json_body": {"prompt": prompt, "input_data": "x" * 1_500_000, "settings": {"answer_schema": SCHEMA}}}
        if body == "large JSON"
        else {
            "data": {"prompt": prompt, "settings": json.dumps({"answer_schema": SCHEMA})},
            "files": {"input_file": ("a.txt", b"hello")},
        }
    )
    with (
        LiveServer(make_settings(fake)) as live,
        held_until_health_answers(monkeypatch, live.url, engine_module, "check_schema", every_call, "schema check"),
    ):
        _, events = stream_run(live.url, **request)
    assert events[-1].event == "final" and events[-1].data["answer_json"] == {"count": 2}
    assert checks == [SCHEMA]


def test_a_schema_larger_than_a_prompt_may_be_is_refused_before_its_check(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old behaviour caught (the attack pass): the length was compared only after the check's process had run,
    up to its 5 s."""
    checks: list[object] = []
    monkeypatch.setattr(answers, "_in_child", lambda request, timeout: checks.append(request))
    huge = {"type": "object", "description": "x" * 2000}
    with LiveServer(make_settings(fake, rlm_max_prompt_chars=1000)) as live:
        response = post_process(live.url, json={"prompt": "count", "settings": {"answer_schema": huge}})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("settings.answer_schema: 2,037 characters of JSON, more than RLM_MAX")
    assert checks == []


def test_schemas_waiting_for_their_check_hold_up_no_other_request_and_no_run(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While two schema checks run (held here) and as many as may wait, one more request with a schema is refused at
    once (429, Retry-After); a run already going still has its answer checked, and a request without a schema
    is read and run. Old behaviour caught (the attack pass): the checks of 60 such requests delayed a running run's
    answer check from 3.6 s to 12.5 s (one pool of threads for both), and no number of them was ever refused."""
    real = answers._in_child
    held = threading.Event()
    holding: list[object] = []

    def check(request: dict[str, Any], timeout: float) -> str | None:
        if request["schema"].get("title") == "slow":
            holding.append(request)
            held.wait(30)
        return real(request, timeout)

    monkeypatch.setattr(answers, "_in_child", check)
    monkeypatch.setattr(answers, "_RUNNING", threading.BoundedSemaphore(2))
    monkeypatch.setattr(answers, "_ADMITTED", threading.BoundedSemaphore(2))
    answer = {"code": ["answer.update(content='{\"count\": 2}', ready=True)"]}
    fake.inject("hold", role="root")
    with LiveServer(make_settings(fake)) as live, ThreadPoolExecutor(3) as pool:
        going = pool.submit(
            stream_run, live.url, json_body={"prompt": script(answer), "settings": {"answer_schema": SCHEMA}}
        )
        assert wait_until(lambda: fake.stats.held == 1), "the first run's root model was not asked"
        slow = {"prompt": script(answer), "settings": {"answer_schema": SCHEMA | {"title": "slow"}}}
        waiting = [pool.submit(stream_run, live.url, json_body=slow) for _ in range(2)]
        assert wait_until(lambda: len(holding) == 2), "the slow checks did not start"
        busy = post_process(live.url, json=slow)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "5", busy.text
        assert "answer schemas are being checked or waiting" in busy.json()["detail"]
        _, plain = stream_run(live.url, json_body={"prompt": script(answer)})
        assert plain[-1].event == "final" and plain[-1].data["answer"] == '{"count": 2}'
        fake.release()
        _, events = going.result()
        assert events[-1].event == "final" and events[-1].data["answer_json"] == {"count": 2}
        held.set()
        for later in waiting:
            assert later.result()[1][-1].data["answer_json"] == {"count": 2}


def test_an_answer_is_checked_off_the_event_loop(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking an answer of megabytes against its schema is pure Python and takes a while (a 4 MB answer that
    broke the schema 1.3 million times held every run and `/health` for 24 s), so it is done in a thread: each
    check here waits until `/health` has answered. Mutants caught: `problem` called on the event loop by the
    controller, or `value` by the run's driver for `final` (each: the health check times out)."""
    prompt = script(
        {"code": ["answer.update(content='{\"count\": -1}', ready=True)"]},
        {"code": ["answer.update(content='{\"count\": 2}', ready=True)"]},
    )
    with (
        LiveServer(make_settings(fake)) as live,
        held_until_health_answers(monkeypatch, live.url, AnswerSchema, "problem", every_call, "answer was checked"),
        held_until_health_answers(monkeypatch, live.url, AnswerSchema, "value", every_call, "answer_json was made"),
    ):
        _, events = stream_run(live.url, json_body={"prompt": prompt, "settings": {"answer_schema": SCHEMA}})
    assert events[-1].event == "final" and events[-1].data["answer_json"] == {"count": 2}


def test_an_answer_breaking_the_schema_everywhere_is_refused_with_a_few_reasons(fake: FakeOpenAI) -> None:
    """An answer of 20,000 wrong items: the root model reads the five most relevant violations and that there
    are more; the check stops collecting at a thousand. Mutant caught: every violation collected (the
    message then counts all 19,995 others)."""
    prompt = script(
        {"code": ["import json\nanswer.update(content=json.dumps([0] * 20_000), ready=True)"]},
        {"code": ["answer.update(content='[]', ready=True)"]},
    )
    schema = {"type": "array", "items": {"type": "string"}}
    with LiveServer(make_settings(fake)) as live:
        _, events = stream_run(live.url, json_body={"prompt": prompt, "settings": {"answer_schema": schema}})
    assert events[-1].event == "final" and events[-1].data["answer_json"] == []
    told = fake.stats.root_bodies[1]["messages"][-1]["content"]
    assert told.count("is not of type 'string'") == 5 and "- and at least 995 more" in told, told


def test_an_answer_that_a_pattern_backtracks_on_freezes_nothing(fake: FakeOpenAI, tmp_path: Path) -> None:
    """`^(a|aa)+$` against forty-eight `a`s and a `!` backtracks for hours, holding Python's interpreter lock the
    whole time: checked in the server (even in a thread), it froze every request. Checked in a process of its
    own, it is stopped after CHECK_TIMEOUT_S, the root model is told, and the server answers all along. Mutant
    caught: the check run in the server's thread (`/health` does not answer within 5 s)."""
    schema = {"type": "string", "pattern": "^(a|aa)+$"}
    prompt = script(
        {"code": ["import json\nanswer.update(content=json.dumps('a' * 48 + '!'), ready=True)"]},
        {"code": ["answer.update(content='\"aa\"', ready=True)"]},
    )
    with spawn_server(tmp_path, model_url=fake.url) as server, httpx2.Client(timeout=60) as client:
        body = {"prompt": prompt, "settings": {"answer_schema": schema}}
        with client.stream("POST", f"{server.url}/process", json=body) as response:
            events = parse_sse(response.iter_lines())
            next(event for event in events if event.event == "code")
            time.sleep(1)  # the cell has marked its answer ready: the check is under way
            health = httpx2.get(f"{server.url}/health", timeout=5)
            rest = list(events)
    assert health.status_code == 200
    assert rest[-1].event == "final" and rest[-1].data["answer_json"] == "aa"
    told = fake.stats.root_bodies[1]["messages"][-1]["content"]
    assert f"could not be checked against the schema within {CHECK_TIMEOUT_S:g} s" in told, told


def test_answers_too_deep_or_too_large_for_the_check_are_refused_and_the_run_goes_on(fake: FakeOpenAI) -> None:
    """Old behaviour caught: a RecursionError or an OverflowError from the check ended the run with an
    `internal` error, its answer lost."""
    prompt = script(
        {"code": ["answer.update(content='[' * 100_000 + ']' * 100_000, ready=True)"]},
        {"code": ["answer.update(content='[1' + '0' * 400 + ']', ready=True)"]},
        {"code": ["answer.update(content='[1.5]', ready=True)"]},
    )
    schema = {"type": "array", "items": {"type": "number", "multipleOf": 0.5}}
    with LiveServer(make_settings(fake)) as live:
        _, events = stream_run(live.url, json_body={"prompt": prompt, "settings": {"answer_schema": schema}})
    assert events[-1].event == "final" and events[-1].data["answer_json"] == [1.5]
    deep, large = (body["messages"][-1]["content"] for body in fake.stats.root_bodies[1:3])
    assert "nested too deeply" in deep, deep
    assert "OverflowError" in large, large
