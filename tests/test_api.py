"""The service over real sockets: uvicorn on one free port, the fake OpenAI server on another."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from typing import Any

import httpx2
import pytest

from rlm_service import api
from rlm_service.api import stop_runs
from rlm_service.repl.workspace import instance_directory
from tests.conftest import (
    LiveServer,
    folded,
    make_settings,
    parse_sse,
    post_process,
    private_tempdir,
    raw_post,
    run_leftovers,
    script,
    stream_run,
    wait_until,
    worker_processes,
)
from tests.fake_openai import FakeOpenAI


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_full_run_streams_events_in_order(live: LiveServer) -> None:
    response, events = stream_run(live.url, json_body={"prompt": "summarize", "input_data": "alpha\nbeta\ngamma"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert folded([(e.event, e.data) for e in events]) == [
        "start",
        "thought",
        "code",
        "output",
        "usage",
        "thought",
        "code",
        "subcalls",
        "output",
        "usage",
        "thought",
        "code",
        "output",
        "answer",
        "usage",
        "final",
    ]
    progress = [e.data for e in events if e.event == "subcalls"]
    assert len(progress) >= 2 and progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 4
    final = events[-1].data
    assert final["ready"] and final["answer"].startswith("## Summary") and final["iterations"] == 3
    assert all(e.data["run_id"] == events[0].data["run_id"] for e in events)


def test_health_config_docs_and_page(live: LiveServer) -> None:
    with httpx2.Client(base_url=live.url) as client:
        assert client.get("/health").json() == {"status": "ok"}
        config = client.get("/api/config").json()
        assert config["model"] == "root-model" and config["key_configured"] is True
        assert "sk-test-key" not in json.dumps(config)
        assert client.get("/docs").status_code == 200
        spec = client.get("/openapi.json").json()
        assert "multipart/form-data" in spec["paths"]["/process"]["post"]["requestBody"]["content"]
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()


def test_file_of_50_mb_reaches_the_repl_whole(live: LiveServer) -> None:
    size = 50 * 1024 * 1024
    line = b"0123456789abcdefghijklmnopqrstuvwxyz log line with some text\n"
    blob = (line * (size // len(line) + 1))[:size]
    prompt = script(
        {"code": ["print(len(context), context.count('\\n'))"]},
        {"code": ["answer.update(content=str(len(context)), ready=True)"]},
    )
    response, events = stream_run(live.url, data={"prompt": prompt}, files={"input_file": ("big.log", blob)})
    assert response.status_code == 200, response.text
    newlines = blob.count(b"\n")
    start = events[0].data
    assert start["input"]["chars"] == size and start["input"]["lines"] == newlines + 1
    output = next(e for e in events if e.event == "output").data
    assert output["stdout"] == f"{size} {newlines}\n"
    assert events[-1].data["answer"] == str(size)


def test_undecodable_bytes_are_replaced(live: LiveServer) -> None:
    prompt = script({"code": ["answer.update(content=repr(context), ready=True)"]})
    _, events = stream_run(live.url, data={"prompt": prompt}, files={"input_file": ("x.bin", b"ok \xff\xfe end")})
    assert events[-1].data["answer"] == repr("ok \ufffd\ufffd end")


def test_refusals_for_configuration_and_capacity(fake: FakeOpenAI) -> None:
    with LiveServer(make_settings(fake, openai_model_name=None)) as server:
        response = post_process(server.url, json={"prompt": "x"})
        assert response.status_code == 503 and "OPENAI_MODEL_NAME" in response.json()["detail"]
    remote = make_settings(fake, openai_api_base="https://api.openai.com/v1", openai_api_key=None)
    with LiveServer(remote) as server:
        response = post_process(server.url, json={"prompt": "x"})
        assert response.status_code == 503 and "OPENAI_API_KEY" in response.json()["detail"]
        assert httpx2.get(f"{server.url}/health").status_code == 200
        assert httpx2.get(f"{server.url}/api/config").json()["key_configured"] is False
    with LiveServer(make_settings(fake, rlm_max_concurrent_runs=1)) as server:
        held = script({"code": ["llm_query('held')\nanswer.update(content='slow', ready=True)"]})
        fake.inject("hold", role="sub")
        first: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: first.update(r=stream_run(server.url, json_body={"prompt": held})))
        thread.start()
        assert wait_until(lambda: fake.stats.held == 1, timeout=60)
        response = post_process(server.url, json={"prompt": "x"})
        assert response.status_code == 429 and "RLM_MAX_CONCURRENT_RUNS" in response.json()["detail"]
        fake.release()
        thread.join()
        assert first["r"][1][-1].data["answer"] == "slow"
        assert wait_until(lambda: server.app.state.slots.active == 0)
        assert stream_run(server.url, json_body={"prompt": "x"})[0].status_code == 200


def test_oversized_upload_refused_early_without_memory_growth(fake: FakeOpenAI) -> None:
    limit = 2 * 1024 * 1024
    with LiveServer(make_settings(fake, rlm_max_input_bytes=limit)) as server:
        headers = {"Content-Type": "application/json", "Content-Length": str(2 * 1024**3)}
        status, body = raw_post(server.port, headers, [b"x" * 65536] * 10)
        assert status == 413 and b"RLM_MAX_INPUT_BYTES" in body
        before = rss_bytes()
        boundary = "b0undary"
        preamble = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="input_file"; filename="f"\r\n\r\n'
        )
        sent = 0

        def body_chunks() -> Any:
            nonlocal sent
            data = preamble.encode()
            yield f"{len(data):x}\r\n".encode() + data + b"\r\n"
            piece = b"y" * (1024 * 1024)
            for _ in range(300):  # up to 300 MB; the server must stop us long before
                sent += len(piece)
                yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"}
        status, body = raw_post(server.port, headers, body_chunks())
        assert status == 413 and b"RLM_MAX_INPUT_BYTES" in body
        assert sent < 50 * 1024 * 1024
        assert rss_bytes() - before < 40 * 1024 * 1024


def test_events_are_numbered_and_keep_alive_comments_fill_the_silences(fake: FakeOpenAI) -> None:
    """Events carry ids 1, 2, 3…; a ping every 0.2 s keeps the connection open: only pings while the cell
    sleeps 1.1 s, and never more than one per 0.2 s of the whole stream. Mutants caught: no pings; pings
    ten times as often (more pings than 0.2 s periods)."""
    with LiveServer(make_settings(fake), ping_s=0.2) as server:
        prompt = script(
            {"code": ["import time\ntime.sleep(1.1)"]}, {"code": ["answer.update(content='ok', ready=True)"]}
        )
        started = time.monotonic()
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": prompt}) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            body = response.read().decode()
        elapsed = time.monotonic() - started
    messages = body.split("\n\n")
    assert messages[-1] == ""  # the stream ends after a whole message
    pings = [m for m in messages if m.startswith(":")]
    assert all(m == ": ping" for m in pings)
    assert len(pings) <= elapsed / 0.2 + 1, (len(pings), elapsed)
    events = [m for m in messages if m.startswith("id: ")]
    assert all(re.fullmatch(r"id: \d+\nevent: [a-z]+\ndata: \{.*\}", m) for m in events), events
    assert [int(m.split("\n")[0][4:]) for m in events] == list(range(1, len(events) + 1))
    kinds = [m.split("\n")[1][len("event: ") :] for m in events]
    assert kinds[0] == "start" and kinds[-1] == "final"
    sleeping = messages[messages.index(next(m for m in events if "event: code" in m)) + 1 :]
    sleeping = sleeping[: sleeping.index(next(m for m in sleeping if "event: output" in m))]
    assert len(sleeping) >= 3 and set(sleeping) == {": ping"}, sleeping  # the cell's 1.1 s of silence


def test_closing_the_client_cancels_the_run(fake: FakeOpenAI) -> None:
    """The batch would take five minutes and no cell timeout would stop it: closing the stream must end the
    run, its worker and its sub-calls. Mutant caught: the run not cancelled when the stream that started it
    closes."""
    fake.sub_latency = 0.3
    with LiveServer(make_settings(fake, rlm_subcall_concurrency=2, rlm_exec_timeout_s=600)) as server:
        prompt = script({"code": ["replies = llm_batch([f'q{i}' for i in range(2000)])"]})
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": prompt}) as response,
        ):
            for event in parse_sse(response.iter_lines()):
                if event.event == "subcalls" and event.data["done"] >= 2:
                    break
        assert wait_until(lambda: not worker_processes() and server.app.state.slots.active == 0, timeout=30)
        requests_once_ended = fake.stats.sub_requests
        time.sleep(1.0)
        assert fake.stats.sub_requests == requests_once_ended < 2000


def test_twenty_concurrent_runs_do_not_cross_talk(live: LiveServer) -> None:
    prompt = script(
        {
            "code": [
                "import time\ntime.sleep(0.2)\nreply = llm_query('echo ' + context)\n"
                "answer.update(content=context + ' | ' + reply, ready=True)"
            ]
        }
    )
    results: dict[int, list[Any]] = {}

    def one(index: int) -> None:
        results[index] = stream_run(live.url, json_body={"prompt": prompt, "input_data": f"input-{index}"})[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(20):
        final = results[index][-1].data
        assert final["answer"].startswith(f"input-{index} | ")
        assert re.search(rf"'echo input-{index}'", final["answer"])


def test_token_guards_process_and_api(fake: FakeOpenAI) -> None:
    with LiveServer(make_settings(fake, rlm_api_token="s3cret-token")) as server:
        assert post_process(server.url, json={"prompt": "x"}).status_code == 401
        wrong = post_process(server.url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "RLM_API_TOKEN" in wrong.json()["detail"]
        assert httpx2.get(f"{server.url}/api/config").status_code == 401
        assert httpx2.get(f"{server.url}/health").status_code == 200
        assert httpx2.get(f"{server.url}/").status_code == 200
        response, events = stream_run(
            server.url, json_body={"prompt": "x"}, headers={"Authorization": "Bearer s3cret-token"}
        )
        assert response.status_code == 200 and events[-1].event == "final"


def test_one_megabyte_split_in_twenty_and_batched(fake: FakeOpenAI) -> None:
    """End to end: the fake server plays root and sub; 20 chunks, one llm_batch, a combined answer."""
    text = "".join(f"record {i:07d} " + "z" * 40 + "\n" for i in range(20000))[: 1024 * 1024]

    def sub(prompt: str) -> str:
        number, _, chunk = prompt.partition("\n")
        return f"{number.split()[1]}:{len(chunk)}"

    fake.sub = sub
    fake.root = lambda messages, body: [
        {
            "code": [
                "size = len(context) // 20 + 1\n"
                "chunks = [context[i * size:(i + 1) * size] for i in range(20)]\n"
                "replies = llm_batch([f'chunk {i}\\n{c}' for i, c in enumerate(chunks)])\n"
                "print(replies[:3])"
            ]
        },
        {"code": ["answer['content'] = '\\n'.join(replies)\nanswer['ready'] = True"]},
    ][sum(1 for m in messages if m.get("role") == "assistant")]
    with LiveServer(make_settings(fake)) as server:
        _, events = stream_run(server.url, json_body={"prompt": "count", "input_data": text})
    final = events[-1].data
    assert final["ready"]
    lines = final["answer"].splitlines()
    assert [line.split(":")[0] for line in lines] == [str(i) for i in range(20)]
    assert sum(int(line.split(":")[1]) for line in lines) == len(text)
    assert fake.stats.sub_requests == 20
    assert all(text[:2000] not in json.dumps(body) for body in fake.stats.root_bodies)


def test_temporary_files_are_removed_whatever_the_outcome(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the runs have ended (a success, a model failure, three refusals, a cancelled run), nothing of
    them is left: not in this server process's instance directory (run directories, spooled uploads), not
    elsewhere in a TMPDIR of this test's own. Mutants caught: the workspace not removed (engine); the
    spooled upload not removed when the multipart body is refused while parsing (uploads) or when its
    settings are refused after (api)."""
    tmp = private_tempdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    instance = instance_directory()

    def leftovers() -> list[str]:
        return run_leftovers(tmp) + [path.name for path in instance.iterdir()]

    with LiveServer(make_settings(fake, rlm_max_input_bytes=1024 * 1024)) as server:
        ok = script({"code": ["answer.update(content='ok', ready=True)"]})
        stream_run(server.url, data={"prompt": ok}, files={"input_file": ("a.txt", b"hello")})
        fake.inject("status", role="root", status=500, count=10)
        _, failed = stream_run(server.url, data={"prompt": "x"}, files={"input_file": ("b.txt", b"hello")})
        assert failed[-1].event == "error" and failed[-1].data["code"] == "model_unavailable"
        fake.faults.clear()
        big = b"x" * (2 * 1024 * 1024)
        too_big = post_process(server.url, data={"prompt": "x"}, files={"input_file": ("c.txt", big)})
        assert too_big.status_code == 413
        for limits in ('{"max_iterations": 0}', '{"max_iterations": 999}'):  # refused while parsing; after
            refused = post_process(
                server.url, files={"prompt": (None, "x"), "settings": (None, limits), "input_file": ("d.txt", b"hello")}
            )
            assert refused.status_code == 422
        slow = script({"code": ["import time\ntime.sleep(30)"]})
        with (
            httpx2.Client(timeout=30) as client,
            client.stream(
                "POST", f"{server.url}/process", data={"prompt": slow}, files={"input_file": ("e.txt", b"hi")}
            ) as r,
        ):
            assert next(e for e in parse_sse(r.iter_lines()) if e.event in ("code", "final", "error")).event == "code"
            assert any(path.name.startswith("run-") for path in instance.iterdir())  # we watch the right place
        assert wait_until(lambda: not leftovers(), timeout=30), leftovers()


def test_one_log_line_per_run_without_key_or_input(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="rlm_service")
    secret_input = "PRIVATE-INPUT-" + "q" * 50
    _, events = stream_run(live.url, json_body={"prompt": "summarize", "input_data": secret_input})
    run_id = events[0].data["run_id"]
    lines = [r.getMessage() for r in caplog.records if run_id in r.getMessage()]
    assert len(lines) == 1
    assert "final" in lines[0] and "3 iterations" in lines[0] and "4 sub-calls" in lines[0] and "tokens" in lines[0]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "PRIVATE-INPUT" not in everything and "sk-test-key" not in everything


def test_no_worker_remains_after_runs_end(live: LiveServer) -> None:
    for _ in range(3):
        assert stream_run(live.url, json_body={"prompt": "x"})[1][-1].event == "final"
    assert wait_until(lambda: worker_processes() == [], timeout=30)


def test_a_run_past_its_time_limit_ends_with_the_timeout_code(fake: FakeOpenAI) -> None:
    """A root request that never answers cannot hold a run past RLM_RUN_TIMEOUT_S (and its grace): the
    stream ends with one `error` whose code is `timeout` and whose message names the variable. Mutants
    caught: no deadline on the run (the stream never ends); the deadline reported as `internal`."""
    fake.inject("hold", role="root")
    with LiveServer(make_settings(fake, rlm_run_timeout_s=1, rlm_root_timeout_s=30)) as server:
        response, events = stream_run(server.url, json_body={"prompt": "x"}, timeout=60)
        fake.release()
    assert response.status_code == 200
    assert [e.event for e in events] == ["start", "error"]
    assert events[-1].data["code"] == "timeout" and "RLM_RUN_TIMEOUT_S" in events[-1].data["message"]


def test_a_stopping_server_cancels_its_runs_and_starts_no_more(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server does at its stop signal (`stop_runs`): a run in a cell ends at once with `error`
    `cancelled` saying that the server is shutting down, the open streams are let go only after it has ended,
    and new runs are refused with 503 and Retry-After (for `POST /process` and `/v1/chat/completions` alike),
    while the rest of the API still answers. Mutants caught: the stopping server still starting runs (200);
    the streams let go before the cancelled runs end."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    streams_let_go: list[bool] = []  # whether the run had ended, at each call of `then`
    monkeypatch.setattr(api, "STOP_RUNS_S", 60)  # however busy the machine, the run ends before that
    with LiveServer(make_settings(fake)) as server:
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": hang}) as response,
        ):
            events = parse_sse(response.iter_lines())
            for event in events:
                if event.event == "code":
                    break
            (run,) = server.app.state.engine.runs.live()
            stop_runs(server.app, then=lambda: streams_let_go.append(run.ended))
            terminal = list(events)[-1]
        assert wait_until(lambda: streams_let_go == [True], timeout=30)
        refused = post_process(server.url, json={"prompt": "x"})
        chat = httpx2.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "rlm", "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        )
        assert httpx2.get(f"{server.url}/health", timeout=30).status_code == 200
    assert terminal.event == "error" and terminal.data["code"] == "cancelled"
    assert "shutting down" in terminal.data["message"]
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert chat.status_code == 503 and "shutting down" in chat.json()["error"]["message"]
