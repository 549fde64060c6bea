"""Runs as server-side resources: numbered events, re-attaching, detached runs, cancelling (over real HTTP)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest

from rlm_service import runs as runs_module
from rlm_service.controller import Controller, RunOutcome
from rlm_service.engine import Engine, EngineClosed, RunSettings
from rlm_service.events import (
    AnswerEvent,
    ChildEvent,
    EventBase,
    FigureEvent,
    FinalEvent,
    OutputEvent,
    ParentRef,
    RunUsage,
    ThoughtEvent,
)
from rlm_service.inputs import RunInput
from rlm_service.repl.workspace import Workspace, instance_directory
from rlm_service.runner import RunDriver, RunPlan, StartLine
from rlm_service.runs import LiveRun, RunRegistry
from rlm_service.streaming import _sse, sse_frame
from tests.conftest import (
    LiveServer,
    SseEvent,
    make_settings,
    parse_sse,
    process_alive,
    removal_held_until_health_answers,
    script,
    spawn_server,
    stream_run,
    ticks_while_read,
    wait_until,
)
from tests.fake_openai import FakeOpenAI

SLOW_BATCH = script(
    {"code": ["replies = llm_batch([f'q{i}' for i in range(12)])\nprint(len(replies))"]},
    {"code": ["import time\ntime.sleep(0.5)\nprint('second cell')"]},
    {"code": ["answer.update(content='done: ' + str(len(replies)), ready=True)"]},
)


def history_settings(fake: FakeOpenAI, tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(fake, rlm_history_db=str(tmp_path / "history.sqlite3"), **overrides)


def follow(
    url: str, run_id: str, *, after: int | None = None, last_event_id: int | None = None, stop: Any = None
) -> list[SseEvent]:
    """GET /api/runs/{id}/events, reading until the stream ends or `stop(event)` is true."""
    params = {"after": after} if after is not None else None
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else None
    events: list[SseEvent] = []
    with (
        httpx2.Client(timeout=60) as client,
        client.stream("GET", f"{url}/api/runs/{run_id}/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            if stop is not None and stop(event):
                break
    return events


def start_detached(
    url: str,
    prompt: str,
    *,
    until: Any,
    settings: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> list[SseEvent]:
    """Start a detached run (with more `settings`) and drop the connection once `until(event)` is true."""
    seen: list[SseEvent] = []
    body = {"prompt": prompt, "settings": {"detach": True, **(settings or {})}}
    with (
        httpx2.Client(timeout=60, headers=headers) as client,
        client.stream("POST", f"{url}/process", json=body) as response,
    ):
        for event in parse_sse(response.iter_lines()):
            seen.append(event)
            if until(event):
                break
    return seen


def seqs(events: list[SseEvent]) -> list[int]:
    return [event.data["seq"] for event in events]


@pytest.mark.parametrize("drop_after", ["start", "code", "subcalls", "output", "usage"])
def test_a_dropped_client_reattaches_and_gets_every_later_event_exactly_once(
    fake: FakeOpenAI, tmp_path: Path, drop_after: str
) -> None:
    """Re-attach at every point of a run: before the first cell, mid-cell, between iterations.
    Mutant caught: `follow(after)` starting at `after - 1` (a duplicate) or `after + 1` (a gap)."""
    fake.sub_latency = 0.1
    with LiveServer(history_settings(fake, tmp_path, rlm_subcall_concurrency=2)) as server:
        first = start_detached(server.url, SLOW_BATCH, until=lambda e: e.event == drop_after)
        run_id = first[0].data["run_id"]
        rest = follow(server.url, run_id, last_event_id=first[-1].data["seq"])
    whole = first + rest
    assert seqs(whole) == list(range(1, len(whole) + 1))
    assert whole[-1].event == "final" and whole[-1].data["answer"] == "done: 12"


def test_after_the_terminal_event_the_rest_is_sent_and_the_stream_closes(fake: FakeOpenAI, tmp_path: Path) -> None:
    with LiveServer(history_settings(fake, tmp_path)) as server:
        _, events = stream_run(server.url, json_body={"prompt": "x"})
        run_id = events[0].data["run_id"]
        assert events[-1].event == "final"
        whole = follow(server.url, run_id)
        tail = follow(server.url, run_id, after=len(events) - 2)
        nothing = follow(server.url, run_id, last_event_id=len(events))
    assert [e.data for e in whole] == [e.data for e in events]
    assert [e.event for e in tail] == [events[-2].event, "final"]
    assert nothing == []


def test_a_reconnect_to_an_after_url_goes_on_from_its_last_event_id(fake: FakeOpenAI, tmp_path: Path) -> None:
    """An EventSource opened on `/events?after=2` reconnects to that same URL with `Last-Event-ID` of the last
    event it got: the server went by `?after` alone and sent events 3… again (the README promises each later
    event exactly once). Whichever of the two is further on counts. Mutant: `?after` taking precedence."""
    with LiveServer(history_settings(fake, tmp_path)) as server:
        _, events = stream_run(server.url, json_body={"prompt": "x"})
        run_id = events[0].data["run_id"]
        reconnected = follow(server.url, run_id, after=2, last_event_id=len(events) - 2)
        opened = follow(server.url, run_id, after=len(events) - 2, last_event_id=2)
    assert seqs(reconnected) == seqs(opened) == [len(events) - 1, len(events)]


def test_ended_runs_are_served_from_history_after_a_restart(fake: FakeOpenAI, tmp_path: Path) -> None:
    with LiveServer(history_settings(fake, tmp_path)) as server:
        _, events = stream_run(server.url, json_body={"prompt": "x"})
    with LiveServer(history_settings(fake, tmp_path)) as restarted:
        again = follow(restarted.url, events[0].data["run_id"], after=1)
        # numbers past what the history's database holds (old behaviour caught, the attack pass: a bare 500)
        past = follow(restarted.url, events[0].data["run_id"], after=2**64)
        past_header = follow(restarted.url, events[0].data["run_id"], last_event_id=2**64)
        cancelled = httpx2.post(f"{restarted.url}/api/runs/{events[0].data['run_id']}/cancel")
    assert [e.data for e in again] == [e.data for e in events[1:]]
    assert past == past_header == []
    assert cancelled.status_code == 409 and "already ended" in cancelled.json()["detail"]


def test_unknown_runs_are_404_and_malformed_ids_too(live: LiveServer) -> None:
    """Refusals quote the id cut short: a 60 KB id is not sent back whole (mutant: `{run_id!r}` in them)."""
    for run_id in ("0123456789abcdef", "x" * 5000, "..%2F..%2Fetc"):
        assert httpx2.get(f"{live.url}/api/runs/{run_id}/events").status_code == 404
        assert httpx2.post(f"{live.url}/api/runs/{run_id}/cancel").status_code == 404
    for path in ("/api/runs/{}/events", "/api/sessions/{}", "/api/runs/{}"):
        refused = httpx2.get(live.url + path.format("y" * 60_000))
        assert refused.status_code == 404 and len(refused.content) < 300, path


def test_a_detached_run_goes_on_after_its_client_leaves(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Mutant caught: cancelling on disconnect whatever `detach` says."""
    fake.sub_latency = 0.1
    with LiveServer(history_settings(fake, tmp_path, rlm_subcall_concurrency=2)) as server:
        first = start_detached(server.url, SLOW_BATCH, until=lambda e: e.event == "code")
        run_id = first[0].data["run_id"]
        slots = server.app.state.slots
        assert wait_until(lambda: slots.active == 0, timeout=30)
        events = follow(server.url, run_id)
    assert events[-1].event == "final" and events[-1].data["ready"]
    assert fake.stats.sub_requests == 12


def test_without_detach_closing_the_stream_still_cancels(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.sub_latency = 0.2
    with LiveServer(history_settings(fake, tmp_path, rlm_subcall_concurrency=1)) as server:
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": SLOW_BATCH}) as response,
        ):
            first = next(parse_sse(response.iter_lines()))
        events = follow(server.url, first.data["run_id"])
    assert events[-1].event == "error" and events[-1].data["code"] == "cancelled"
    assert "client disconnected" in events[-1].data["message"]
    assert fake.stats.sub_requests < 12


def test_a_client_that_leaves_while_its_stream_is_held_up_still_cancels_the_run(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The client stops reading while a 4 MB answer is sent to it, then closes the connection: the stream ends
    while it is sending, not while it waits for the run's next event, and the run must still be cancelled. Old
    behaviour caught: the event stream's own generator was closed, but the run's stream inside it was left
    suspended for the garbage collector, so the run went on (here a cell that sleeps 300 s)."""
    big = script(
        {"code": ["answer.update(content='x' * 4_000_000)"]},
        {"code": ["import time\ntime.sleep(300)"]},
    )
    body = json.dumps({"prompt": big}).encode()
    with LiveServer(history_settings(fake, tmp_path)) as server:
        engine = server.app.state.engine
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", server.port))
        head = "POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert b"x-run-id: " in received.lower(), received[:500]
        run_id = received.decode("latin-1").lower().split("x-run-id: ", 1)[1][:16]
        assert wait_until(lambda: any(e.type == "code" and e.iteration == 2 for e in engine.runs.get(run_id).events))
        sock.close()  # with the answer's frame still being sent
        assert wait_until(lambda: engine.runs.get(run_id).ended, timeout=20)
        events = engine.runs.get(run_id).events
    assert events[-1].type == "error" and events[-1].code == "cancelled", events[-1]
    assert "client disconnected" in events[-1].message


def test_cancel_from_a_second_client_ends_the_run_for_every_follower(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.sub_latency = 0.3
    with LiveServer(history_settings(fake, tmp_path, rlm_subcall_concurrency=1)) as server:
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": SLOW_BATCH}) as response,
        ):
            events = parse_sse(response.iter_lines())
            start = next(events)
            run_id = start.data["run_id"]
            cancelled = httpx2.post(f"{server.url}/api/runs/{run_id}/cancel")
            rest = list(events)
        again = httpx2.post(f"{server.url}/api/runs/{run_id}/cancel")
        followed = follow(server.url, run_id)
    assert cancelled.status_code == 202
    assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled"
    assert followed[-1].data == rest[-1].data
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    assert sum(1 for e in rest if e.event in ("final", "error")) == 1


def test_a_detached_run_nobody_reattaches_ends_within_its_limits_and_frees_its_worker(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    forever = script({"code": ["import time\ntime.sleep(600)"]})
    with LiveServer(history_settings(fake, tmp_path, rlm_exec_timeout_s=2, rlm_max_iterations=2)) as server:
        first = start_detached(server.url, forever, until=lambda e: e.event == "code")
        engine = server.app.state.engine
        assert wait_until(lambda: not engine.runs.live(), timeout=30)
        events = follow(server.url, first[0].data["run_id"])
    assert events[-1].event == "final" and not events[-1].data["ready"]
    assert any(e.event == "output" and "TimeoutError" in (e.data["error"] or "") for e in events)


def test_a_client_that_stops_reading_loses_its_run_and_its_slot(fake: FakeOpenAI, tmp_path: Path) -> None:
    """#14 item 11: the run's events pile up in no queue, the send timeout drops the client, the run is
    cancelled and its slot freed. Mutant caught: no send timeout (the run holds its slot for good)."""
    flood = script(*[{"code": ["print('x' * 400_000)"]} for _ in range(40)])
    settings = history_settings(
        fake, tmp_path, rlm_send_timeout_s=1, rlm_max_output_chars=500_000, rlm_max_iterations=40
    )
    with LiveServer(settings) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            body = json.dumps({"prompt": flood}).encode()
            sock.sendall(
                b"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            slots = server.app.state.slots
            assert wait_until(lambda: slots.active == 1, timeout=10)
            assert wait_until(lambda: slots.active == 0, timeout=60)
            run_id = httpx2.get(f"{server.url}/api/runs").json()["runs"][0]["id"]
        ended = follow(server.url, run_id, after=0)
    assert ended[-1].event == "error" and ended[-1].data["code"] == "cancelled"
    assert sum(1 for e in ended if e.event == "output") < 40


def test_every_event_of_process_carries_its_number_as_the_sse_id(live: LiveServer) -> None:
    with (
        httpx2.Client(timeout=60) as client,
        client.stream("POST", f"{live.url}/process", json={"prompt": "x"}) as response,
    ):
        body = response.read().decode()
    ids = [int(line[4:]) for line in body.split("\n") if line.startswith("id: ")]
    datas = [line for line in body.split("\n") if line.startswith("data: ")]
    assert ids == list(range(1, len(datas) + 1))


def test_the_run_id_comes_with_the_response_headers(live: LiveServer) -> None:
    """A client that loses the connection before the first event can still re-attach."""
    with (
        httpx2.Client(timeout=60) as client,
        client.stream("POST", f"{live.url}/process", json={"prompt": "x", "settings": {"session": True}}) as response,
    ):
        run_id, session_id = response.headers["x-run-id"], response.headers["x-session-id"]
        first = next(parse_sse(response.iter_lines()))
    assert first.data["run_id"] == run_id and first.data["session_id"] == session_id


BIG_ANSWERS = script(
    {"code": ["answer.update(content='a' * 3_000_000)"]},
    {"code": ["answer.update(content='b' * 3_000_000)"]},
    {"code": ["answer.update(content='c' * 3_000_000, ready=True)"]},
)


def test_a_run_keeps_answers_it_replaced_cut_and_its_followers_get_the_latest_whole(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Three answers of 3 MB in a row: the run's own client saw each whole as it came; a client re-attaching
    afterwards gets the first two cut (saying so) and the last whole, and the run holds about one answer's
    worth, not three (so a run that rewrites a large answer every turn cannot fill the server). Mutants: no
    cut on a new answer (the re-attaching client gets 3 MB of 'a'; the run holds 9 M characters); the cut
    made in place on the event (the live client's own answers arrive cut)."""
    with LiveServer(history_settings(fake, tmp_path)) as server:
        _, live_events = stream_run(server.url, json_body={"prompt": BIG_ANSWERS, "input_data": "x"})
        run_id = live_events[0].data["run_id"]
        replayed = follow(server.url, run_id)
        run = server.app.state.engine.runs.get(run_id)
        assert run is not None
        held = run.chars
    live_answers = [event.data["content"] for event in live_events if event.event == "answer"]
    assert [len(content) for content in live_answers] == [3_000_000] * 3
    answers = [event.data["content"] for event in replayed if event.event == "answer"]
    assert answers[0].startswith("a" * 65536) and "earlier answer are not kept" in answers[0]
    assert len(answers[0]) < 70_000 and len(answers[1]) < 70_000 and answers[2] == "c" * 3_000_000
    assert replayed[-1].event == "final" and replayed[-1].data["answer"] == "c" * 3_000_000
    assert held < 6_500_000  # the last answer, and `final` with the same text


def test_a_run_keeps_a_bounded_amount_of_figures_the_newest_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's figures past LIVE_FIGURE_CHARS are kept without their image, oldest first; the figure as sent stays
    whole. Old behaviour caught (the attack pass): every figure was kept whole while the run lived, and cells
    sending eight figures of 2.7 MB each, 120 cells, took the server from 1.2 to 2.9 GB."""
    monkeypatch.setattr(runs_module, "LIVE_FIGURE_CHARS", 1_000_000)
    run = LiveRun("0123456789abcdef")
    sent = [FigureEvent(run_id=run.id, iteration=n, data=str(n % 10) * 300_000) for n in range(10)]
    for figure in sent:
        run.emit(figure)
    kept = [event.data for event in run.events if isinstance(event, FigureEvent)]
    assert kept[:7] == [""] * 7 and kept[7:] == [figure.data for figure in sent[7:]]
    assert all(len(figure.data) == 300_000 for figure in sent) and run.chars < 1_000_000
    # a child run's figures (rlm_batch) count with the root's (the review: they were kept whole, and uncounted)
    parent = ParentRef(run_id=run.id, iteration=1)
    for _ in range(4):
        figure = {"type": "figure", "iteration": 1, "mime": "image/png", "data": "c" * 300_000}
        run.emit(ChildEvent(run_id=run.id, depth=1, parent=parent, event="figure", data=figure))
    images = [len(event.data) if isinstance(event, FigureEvent) else len(event.data["data"]) for event in run.events]
    assert images[-3:] == [300_000] * 3 and sum(images) == 900_000 and 900_000 <= run.chars < 1_000_000
    run.emit(FigureEvent(run_id=run.id, iteration=10, data="x" * 3_000_000))  # larger than the bound: kept whole
    assert [len(event.data) for event in run.events if isinstance(event, FigureEvent)][-2:] == [0, 3_000_000]


def test_a_large_event_is_framed_once_for_all_its_followers() -> None:
    """Followers of a run share a large event's stream frame: `encode` runs once however many follow it, and
    for a small event once per follower. Mutant: `frame` without its cache (encode runs per follower)."""
    run = LiveRun("0123456789abcdef")
    run.emit(AnswerEvent(run_id=run.id, content="x" * 100_000, ready=False))
    run.emit(ThoughtEvent(run_id=run.id, iteration=1, text="small"))
    made: list[int] = []

    def encode(event: EventBase) -> bytes:
        made.append(event.seq)
        return event.model_dump_json().encode()

    big, small = run.events
    frames = [run.frame(event, encode) for _ in range(8) for event in (big, small)]
    assert made.count(1) == 1 and made.count(2) == 8
    assert all(frame is frames[0] for frame in frames[::2])


def test_ended_runs_stay_in_memory_within_a_budget_of_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ended runs are kept for re-attaching clients by what they hold, not only by count: past the budget
    the oldest go (history still has them). Mutant: pruning by count and age only (all three stay)."""
    monkeypatch.setattr(runs_module, "ENDED_KEPT_CHARS", 250_000)
    registry = RunRegistry()
    ids = [f"{index:016x}" for index in range(3)]
    for run_id in ids:
        run = LiveRun(run_id)
        registry.add(run)
        run.emit(
            FinalEvent(run_id=run_id, answer="z" * 100_000, ready=True, iterations=1, usage=RunUsage(), elapsed_ms=1)
        )
    assert [registry.get(run_id) is not None for run_id in ids] == [False, True, True]


def test_the_server_answers_while_an_ended_run_s_files_are_deleted(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run may leave up to 100,000 files in its directory, and deleting them takes about a second: that is
    done in a thread, and the server answers meanwhile. Mutant: the deletion on the event loop (as it was)
    → `/health` gets no answer while it lasts."""
    done = script({"code": ["answer.update(content='done', ready=True)"]})
    with LiveServer(make_settings(fake)) as server, removal_held_until_health_answers(monkeypatch, server.url):
        _, events = stream_run(server.url, json_body={"prompt": done, "input_data": "x"})
    assert events[-1].event == "final" and events[-1].data["answer"] == "done"


async def test_a_stream_lets_the_server_serve_others_between_its_events() -> None:
    """Sending to a client that reads fast never waits: the 12,000 events of a 6,000-cell run, replayed at once,
    held `/health` for 223 ms while they were framed and sent. The stream passes through the event loop after
    each event, whether it replays a list (history) or follows a run. Mutant caught: either
    `await asyncio.sleep(0)` in `streaming._sse` removed (every event is then read at the same count)."""
    events = [ThoughtEvent(run_id="r", seq=n, iteration=1, text="x") for n in range(1, 51)]

    async def followed() -> AsyncIterator[EventBase]:
        for event in events:
            yield event

    for source in (events, followed()):
        counts = [count for _, count in await ticks_while_read(_sse(source, sse_frame))]
        assert len(set(counts)) == len(events), counts


def test_a_client_that_stops_reading_is_disconnected(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A client re-attaches to a run of 8 MB of output and reads nothing. Once it has accepted no event for
    RLM_SEND_TIMEOUT_S, the server ends the connection (the kernel does, for the connections of its socket), and
    the stream's buffered bytes go with it. Old behaviour caught (the attack pass): the stream was dropped, but
    uvicorn's close waited for the unsent bytes to go out first, so the connection and megabytes of buffer stayed
    for as long as the client kept it open (200 such clients held 470 MB for minutes)."""
    big = script(*[{"code": ["print('x' * 400_000)"]} for _ in range(20)], {"code": ["answer.update(ready=True)"]})
    with spawn_server(
        tmp_path, model_url=fake.url, RLM_SEND_TIMEOUT_S="2", RLM_MAX_OUTPUT_CHARS="500000", RLM_MAX_ITERATIONS="30"
    ) as server:
        _, events = stream_run(server.url, json_body={"prompt": big})
        run_id = events[0].data["run_id"]
        port = int(server.url.rsplit(":", 1)[1])
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET /api/runs/{run_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            client_port = sock.getsockname()[1]
            assert wait_until(lambda: _server_side_open(port, client_port), timeout=10)
            assert wait_until(lambda: not _server_side_open(port, client_port), timeout=30)
            sock.settimeout(30)
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass


def _server_side_open(server_port: int, client_port: int) -> bool:
    """Whether the server still holds its end of the TCP connection from `client_port` (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return True
    return False


def test_streams_of_a_past_run_hold_a_page_of_it_each_not_all_of_it(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Thirty clients re-attach to a past run of 8 MB of output at once and read nothing: each stream holds a page
    of the run's events (followers.PAGE_CHARS, or one event larger than that) while it waits, not the whole run:
    the server grew by 4 MiB a stream here. Old behaviour caught (the attack pass, through another replica, which
    reads the history the same way): every stream read the whole run first, and the server grew by 10-12 MiB a
    stream, so a reconnect storm multiplied the run's size by its clients."""
    big = script(*[{"code": ["print('x' * 1_000_000)"]} for _ in range(8)], {"code": ["answer.update(ready=True)"]})
    clients = 30
    env = {"RLM_SEND_TIMEOUT_S": "120", "RLM_MAX_OUTPUT_CHARS": "1100000", "RLM_MAX_ITERATIONS": "20"}
    env["MALLOC_ARENA_MAX"] = "1"  # the memory freed by the threads that read the history is reused, not kept aside
    with spawn_server(tmp_path, model_url=fake.url, **env) as server:
        _, events = stream_run(server.url, json_body={"prompt": big})
        run_id = events[0].data["run_id"]
    with spawn_server(tmp_path, model_url=fake.url, **env) as server:  # the run is in its history, not its memory
        port = int(server.url.rsplit(":", 1)[1])
        before = server.rss()
        sockets = []
        try:
            for _ in range(clients):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(f"GET /api/runs/{run_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                sockets.append(sock)
            # every stream has begun: its first events are on their way (a page read), then it waits
            assert wait_until(lambda: all(_has_data(sock) for sock in sockets), timeout=30)
            grown = _settled(lambda: server.rss() - before)
        finally:
            for sock in sockets:
                sock.close()
    assert grown < clients * 6 * 2**20, f"{grown / 2**20:.0f} MiB for {clients} streams"


def _has_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _settled(read: Callable[[], int], timeout: float = 30) -> int:
    """The largest of `read()` over a few seconds once it has stopped growing (by 2% over 1 s), or at the deadline."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = read()
        if now <= last * 1.02:
            return max(now, last)
        last = now
    return last


async def test_the_start_line_lets_runs_through_one_at_a_time_in_the_order_they_came() -> None:
    """`StartLine`: one run at a time from its start to its first model request, first come first served; a
    run's workspace waits until the runs in line with it have gone through; leaving twice is leaving once."""
    line = StartLine()
    log: list[str] = []
    turns = [asyncio.Event() for _ in range(3)]

    async def run(number: int) -> None:
        leave = await line.enter()
        log.append(f"in {number}")
        await turns[number].wait()
        log.append(f"out {number}")
        leave()
        leave()

    async def workspace() -> None:
        await line.passed()
        log.append("workspace")

    runs = [asyncio.create_task(run(number)) for number in range(3)]
    await asyncio.sleep(0.05)
    made = asyncio.create_task(workspace())  # made while the three are in line: after all three
    late = asyncio.create_task(run(0))  # a run that came after: not waited for
    turns[0].set()
    await asyncio.sleep(0.05)
    assert log == ["in 0", "out 0", "in 1"]
    turns[2].set()
    turns[1].set()
    await asyncio.wait_for(asyncio.gather(*runs, made, late), 10)
    assert log == ["in 0", "out 0", "in 1", "out 1", "in 2", "out 2", "workspace", "in 0", "out 0"]


async def test_a_run_cancelled_while_in_the_start_line_leaves_it() -> None:
    line = StartLine()
    leave = await line.enter()
    waiting = asyncio.create_task(line.enter())
    await asyncio.sleep(0.05)
    waiting.cancel()
    leave()
    await asyncio.wait_for(line.passed(), 10)


@pytest.mark.parametrize("session", [False, True])
def test_a_run_that_fails_before_its_first_model_request_does_not_hold_up_the_runs_after_it(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, session: bool
) -> None:
    """A run leaves the start line at its first model request, or at its end if it never makes one. Mutants
    caught: `leave_line()` taken out of `RunDriver._fresh`'s `finally` (the next run then waits forever); for a
    run that asked for a session, out of the inner `finally` (the review: it waited there up to START_WAIT_S,
    60 s, for its REPL, whose start waited for the line it held)."""
    run_controller = Controller.run

    async def failing_first(self: Controller, task_message: str) -> RunOutcome:
        if "fail before asking" in task_message:
            raise RuntimeError("no model request made")
        return await run_controller(self, task_message)

    monkeypatch.setattr(Controller, "run", failing_first)
    failing = {"prompt": "fail before asking", "input_data": "x", "settings": {"session": session}}
    done = {"prompt": script({"code": ["answer.update(content='done', ready=True)"]}), "input_data": "x"}
    with LiveServer(make_settings(fake)) as server, ThreadPoolExecutor(1) as pool:
        try:  # in a thread: the stream's pings would keep a read timeout from ever firing
            _, failed = pool.submit(stream_run, server.url, json_body=failing).result(timeout=30)
            assert failed[-1].event == "error" and failed[-1].data["code"] == "internal"
            _, events = pool.submit(stream_run, server.url, json_body=done).result(timeout=30)
        finally:
            server.server.should_exit = True  # a run still waiting is cancelled, and its stream ends
    assert events[-1].event == "final" and events[-1].data["answer"] == "done"


async def test_a_run_cancelled_before_its_task_began_still_ends_with_its_error(fake: FakeOpenAI) -> None:
    """The server's stop cancels every live run at once (`api.stop_runs`), and a run launched by a request in the
    same turn of the loop has not begun. Old behaviour caught (the attack pass): its task, cancelled before its
    first step, never ran the driver: no `error` event (its followers waited for ever), the run stayed live, and
    the room it had taken for a session was never given back nor used."""
    async with Engine(make_settings(fake, rlm_max_sessions=1)) as engine:
        run = engine.launch("x", RunInput.from_text("abc"), RunSettings(session=True))
        assert run.cancel("the server is stopping")
        async with asyncio.timeout(30):
            events = [event async for event in run.follow()]
        assert [event.type for event in events][-1] == "error"
        assert events[-1].code == "cancelled" and "the server is stopping" in events[-1].message  # type: ignore[attr-defined]
        # the session was kept, or its room given back
        assert engine.runs.live() == [] and engine.sessions.capacity.used == len(engine.sessions)


async def test_a_run_cancelled_again_while_it_cleans_up_still_removes_its_files(fake: FakeOpenAI) -> None:
    """A user who presses stop twice, or a cancel that meets the client's disconnect, asks for a second cancel
    while the run's first one is still being carried out. Old behaviour caught: the second cancel interrupted the
    run's clean-up, and its directory, with the user's input in it, stayed on disk until the server stopped (seen
    with two `POST /api/runs/{id}/cancel` a millisecond apart, most tries)."""
    hang = script({"code": ["import time\ntime.sleep(60)"]})

    def run_directories() -> set[str]:
        return {path.name for path in instance_directory().iterdir() if path.name.startswith("run-")}

    async with Engine(make_settings(fake)) as engine:
        before = run_directories()  # another test's, if any: not this run's to remove
        run = engine.launch(hang, RunInput.from_text("private input"), RunSettings())
        async with asyncio.timeout(30):
            async for event in run.follow():
                if event.type == "code":
                    break
            assert run_directories() - before
            while not run.ended:  # a cancel at every turn of the loop until the run has ended
                assert run.cancel("pressed again")
                await asyncio.sleep(0)
            await run.wait()
        assert run_directories() - before == set()


async def test_a_run_cancelled_just_as_it_ends_still_stops_its_worker_and_removes_its_files(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves (or stops the run, or a server that stops) just as the run has its answer cancels it
    at the first wait of its clean-up. Old behaviour caught: the cancellation cut the clean-up short there, and
    the run's worker went on running (its input in memory), its directory (the input) stayed on disk and its uid
    stayed taken, until the server stopped."""
    made: list[Workspace] = []
    make_workspace = RunDriver._workspace
    control = RunDriver._control
    launched: list[LiveRun] = []

    def workspace(self: RunDriver, plan: RunPlan) -> Workspace:
        made.append(make_workspace(self, plan))
        return made[-1]

    async def answered_then_left(self: RunDriver, *args: Any, **kwargs: Any) -> RunOutcome:
        outcome = await control(self, *args, **kwargs)
        launched[0].cancel("the client disconnected")  # the run's clean-up comes next
        return outcome

    monkeypatch.setattr(RunDriver, "_workspace", workspace)
    monkeypatch.setattr(RunDriver, "_control", answered_then_left)
    done = script({"code": ["import os\nprint(os.getpid())\nanswer.update(content='done', ready=True)"]})
    async with Engine(make_settings(fake)) as engine:
        launched.append(run := engine.launch(done, RunInput.from_text("private input"), RunSettings()))
        async with asyncio.timeout(30):
            await run.wait()
        assert run.events[-1].type == "error" and run.events[-1].code == "cancelled"  # type: ignore[attr-defined]
        worker = int(next(event.stdout for event in run.events if isinstance(event, OutputEvent)))
        assert wait_until(lambda: not process_alive(worker), timeout=10), "the run's worker is still running"
        assert [workspace.root.exists() for workspace in made] == [False]
        assert made[0].worker_uid is None  # given back (a server that is not root has none to give)


async def test_a_session_run_cancelled_while_it_waits_for_its_repl_at_its_end_ends_cancelled_and_keeps_it(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that asked for a session and had its answer before its REPL was up waits for the REPL at its end,
    to keep it as the session. Old behaviour caught: a cancel that came then (the user pressing stop, the client
    leaving) was swallowed: the cancel was accepted, and the run went on to end `final`."""
    prepare, control = RunDriver._prepare, RunDriver._control
    waiting = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_prepare(self: RunDriver, *args: Any, **kwargs: Any) -> Any:
        waiting.set()
        await go_on.wait()
        return await prepare(self, *args, **kwargs)

    async def answered_at_once(self: RunDriver, *args: Any, **kwargs: Any) -> RunOutcome:
        return RunOutcome(answer="done", ready=True, iterations=1)

    monkeypatch.setattr(RunDriver, "_prepare", slow_prepare)
    monkeypatch.setattr(RunDriver, "_control", answered_at_once)
    async with Engine(make_settings(fake)) as engine:
        run = engine.launch("x", RunInput.from_text("abc"), RunSettings(session=True))
        async with asyncio.timeout(30):
            await waiting.wait()
            for _ in range(10):  # the run is past its answer, waiting for the REPL
                await asyncio.sleep(0)
            assert not run.ended
            assert run.cancel("pressed stop")
            await asyncio.sleep(0.05)
            go_on.set()
            await run.wait()
        assert run.events[-1].type == "error" and run.events[-1].code == "cancelled"  # type: ignore[attr-defined]
        monkeypatch.setattr(RunDriver, "_control", control)
        follow_up = engine.launch(
            script({"code": ["answer.update(content=context, ready=True)"]}),
            RunInput.from_text(""),
            session_id=run.session_id,
        )
        async with asyncio.timeout(30):
            await follow_up.wait()
        assert follow_up.events[-1].type == "final" and follow_up.events[-1].answer == "abc"  # type: ignore[attr-defined]


async def test_an_engine_that_is_closing_refuses_new_runs(fake: FakeOpenAI) -> None:
    """From Python (`Engine`), a run asked for once `aclose` has begun is refused. Old behaviour caught: it was
    launched, started the workers' zygote again after the engine had stopped it (a process that outlived the
    engine) and made its files in a run directory already given back."""
    hang = script({"code": ["import time\ntime.sleep(60)"]})
    engine = Engine(make_settings(fake))
    await engine.start()
    live = engine.launch(hang, RunInput.from_text("abc"), RunSettings())
    closing = asyncio.ensure_future(engine.aclose())
    await asyncio.sleep(0)
    with pytest.raises(EngineClosed, match="closing or closed"):
        engine.launch("x", RunInput.from_text("abc"), RunSettings())
    async with asyncio.timeout(30):
        await closing
    assert live.events[-1].type == "error" and live.events[-1].code == "cancelled"  # type: ignore[attr-defined]
    with pytest.raises(EngineClosed):
        engine.launch("x", RunInput.from_text("abc"), RunSettings())
