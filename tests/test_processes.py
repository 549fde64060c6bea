"""WEB_CONCURRENCY: one instance served by several processes on one port, with the instance's limits."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx2
import openai

from rlm_service.capacity import SharedCapacity, zero
from tests.conftest import (
    ROOT_MODEL,
    RealServer,
    SseEvent,
    parse_sse,
    post_process,
    process_alive,
    script,
    spawn_server,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI
from tests.test_openai_api import task_script_root


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _server_processes(supervisor: int) -> list[int]:
    """The supervisor's server processes (not the JSON parser or other short-lived children)."""
    processes = []
    for child in _children(supervisor):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"main.py" in handle.read():
                    processes.append(child)
        except OSError:
            continue
    return processes


def _listening(server: RealServer) -> list[int]:
    """The server processes that listen on the server's port: those whose startup is done (a process listens
    only then), as the kernel's socket tables and the processes' descriptors tell."""
    port = int(server.url.rsplit(":", 1)[1])
    listeners = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    listeners.add(f"socket:[{fields[9]}]")
    found = []
    for pid in _server_processes(server.pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in listeners:
                        found.append(pid)
                        break
    return found


def test_two_processes_share_the_port_and_the_run_limit(tmp_path: Path) -> None:
    """Mutant caught: each process counting only its own runs (the instance then takes 4 with a limit of 2)."""
    slow = script({"code": ["import time\ntime.sleep(4)\nanswer.update(content='ok', ready=True)"]})
    with spawn_server(tmp_path, WEB_CONCURRENCY="2", RLM_MAX_CONCURRENT_RUNS="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        results: list[int] = []

        def run() -> None:
            response, _ = stream_run(server.url, json_body={"prompt": slow}, timeout=60)
            results.append(response.status_code)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: httpx2.get(f"{server.url}/api/config").json()["active_runs"] == 2, timeout=20)
        refused = [post_process(server.url, json={"prompt": "x"}).status_code for _ in range(6)]
        for thread in threads:
            thread.join(60)
    assert results == [200, 200]
    assert refused == [429] * 6  # whichever process took the connection


def test_a_server_process_that_dies_is_replaced(tmp_path: Path) -> None:
    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        victim = _listening(server)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in _listening(server) and len(_listening(server)) == 2, timeout=60)
        for _ in range(4):
            response, events = stream_run(server.url, json_body={"prompt": "x"})
            assert response.status_code == 200 and events[-1].event == "final"


def test_a_process_that_cannot_start_takes_no_connections(tmp_path: Path) -> None:
    """A server process dies, and its replacement cannot start: the history file is locked (as a database
    that cannot be reached would hold it) until the replacement gives up. Meanwhile every request, each on a
    new connection, is answered by the process that serves: none waits for the replacement and none is reset
    when it gives up. Then the instance has its two processes again. Mutant caught: a process listening from
    its fork, before its startup (requests were reset)."""
    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)  # both started: one is to serve alone
        before = set(_server_processes(server.pid))
        victim = min(before)
        failures: list[str] = []
        answered: list[int] = []
        stop = threading.Event()

        def ask_health() -> None:
            while not stop.is_set():
                try:
                    answered.append(httpx2.get(f"{server.url}/health", timeout=60).status_code)
                except httpx2.HTTPError as exc:
                    failures.append(repr(exc))

        with sqlite3.connect(tmp_path / "history.sqlite3", isolation_level=None) as lock:
            lock.execute("BEGIN IMMEDIATE")
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: set(_server_processes(server.pid)) - before, timeout=30)
            (replacement,) = set(_server_processes(server.pid)) - before
            asker = threading.Thread(target=ask_health)
            asker.start()
            try:  # it gives up when SQLite's wait for the lock (5 s) has passed
                assert wait_until(lambda: replacement not in _server_processes(server.pid), timeout=60)
            finally:
                stop.set()
                asker.join(90)
            lock.execute("ROLLBACK")
        assert failures == [] and answered and set(answered) == {200}
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        for _ in range(4):
            response, events = stream_run(server.url, json_body={"prompt": "x"})
            assert response.status_code == 200 and events[-1].event == "final"


def test_a_process_killed_while_counting_leaves_the_counts_usable() -> None:
    """A server process killed with SIGKILL in the middle of taking and giving back run slots, twenty times:
    each time, the supervisor's `zero` of its count and another process's `try_take` complete at once and the
    limit holds. Mutant: the counts behind one lock shared by the processes (multiprocessing.Array): a process
    killed while holding it left it held, and the supervisor and every other process waited forever (seen as
    `test_a_server_process_that_dies_is_replaced` timing out: no replacement came)."""
    counts = multiprocessing.RawArray("i", 2)
    survivor = SharedCapacity(3, counts, 1)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the doomed process: takes and gives back as fast as it can until it is killed
            doomed = SharedCapacity(3, counts, 0)
            while True:
                if doomed.try_take():
                    doomed.give()
        time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        finished = threading.Event()

        def recover(done: threading.Event) -> None:
            zero(counts, 0)
            taken = [survivor.try_take() for _ in range(4)]
            assert taken == [True, True, True, False]
            for _ in range(3):
                survivor.give()
            done.set()

        threading.Thread(target=recover, args=(finished,), daemon=True).start()
        assert finished.wait(10), "the counts stayed locked by the killed process"


class _Stream(threading.Thread):
    """`POST /process` (or, with `run_id`, `GET /api/runs/{id}/events`) read in a thread: its events as they come,
    and what cut it if it was cut."""

    def __init__(self, url: str, prompt: str = "", run_id: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.run_id = url, prompt, run_id
        self.events: list[SseEvent] = []
        self.failure: str | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx2.Client(timeout=120) as client:
                if self.run_id is None:
                    request = client.stream("POST", f"{self.url}/process", json={"prompt": self.prompt})
                else:
                    request = client.stream("GET", f"{self.url}/api/runs/{self.run_id}/events")
                with request as response:
                    for event in parse_sse(response.iter_lines()):
                        self.events.append(event)
        except httpx2.HTTPError as exc:
            self.failure = repr(exc)


def test_runs_live_when_the_instance_stops_end_with_their_terminal_event(tmp_path: Path) -> None:
    """SIGTERM to the supervisor of two server processes while two runs hang in a cell, each streamed to the
    client that started it and to a follower: every stream ends with its run's terminal event, `error`
    `cancelled` saying that the server is shutting down, and the supervisor exits. Old behaviour caught: the
    streams were cut without a terminal event (`RemoteProtocolError: incomplete chunked read`), because
    sse-starlette ends them at the shutdown signal and the engine cancelled their runs only afterwards, at the
    app's shutdown, when no stream was left to carry the `error` event."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        owners = [_Stream(server.url, hang) for _ in range(2)]
        assert wait_until(lambda: all(any(e.event == "code" for e in s.events) for s in owners), timeout=60)
        followers = [_Stream(server.url, run_id=str(s.events[0].data["run_id"])) for s in owners]
        assert wait_until(lambda: all(any(e.event == "code" for e in s.events) for s in followers), timeout=60)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        for stream in owners + followers:
            stream.join(60)
    for stream in owners + followers:
        assert stream.failure is None
        assert stream.events[-1].event == "error" and stream.events[-1].data["code"] == "cancelled"
        assert "shutting down" in stream.events[-1].data["message"]


def test_server_processes_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the supervisor (as the kernel's OOM killer sends it) while a run hangs in a cell: both server
    processes stop, as on a clean stop, and the run's stream ends with `error` `cancelled`. Old behaviour
    caught: the processes went on serving the port unsupervised (both alive 3 s after, /health answered), and
    the run hung on."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        orphans = _server_processes(server.pid)
        stream = _Stream(server.url, hang)
        assert wait_until(lambda: any(event.event == "code" for event in stream.events), timeout=60)
        try:
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(30)
            stopped = wait_until(lambda: not any(process_alive(pid) for pid in orphans), timeout=60)
            stream.join(60)
        finally:
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert stopped
    assert stream.failure is None and stream.events[-1].event == "error"
    assert stream.events[-1].data["code"] == "cancelled"


def test_a_streamed_chat_completion_live_when_the_instance_stops_ends_with_its_error_and_done(tmp_path: Path) -> None:
    """SIGTERM to the supervisor while a `stream: true` chat completion's run hangs in a cell: the stream ends
    with an OpenAI error object saying the server is shutting down, then `data: [DONE]`. Old behaviour caught:
    the stream was cut (`RemoteProtocolError: incomplete chunked read`), as `/process` streams were."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    body = {"model": "rlm", "messages": [{"role": "user", "content": hang}], "stream": True}
    data: list[str] = []
    failure: list[str] = []

    def read() -> None:
        try:
            with (
                httpx2.Client(timeout=120) as client,
                client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response,
            ):
                data.extend(line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: "))
        except httpx2.HTTPError as exc:
            failure.append(repr(exc))

    model = FakeOpenAI(root_model=ROOT_MODEL, root=task_script_root).start()
    try:
        with spawn_server(tmp_path, model_url=model.url, WEB_CONCURRENCY="2") as server:
            assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert wait_until(lambda: any("time.sleep(300)" in line for line in data), timeout=60)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(60) == 0
            reader.join(60)
    finally:
        model.stop()
    assert failure == [] and data[-1] == "[DONE]"
    assert "shutting down" in json.loads(data[-2])["error"]["message"]


def test_a_chat_completion_waiting_when_the_server_stops_is_answered_503_to_retry(tmp_path: Path) -> None:
    """SIGTERM to a one-process server while a non-streamed chat completion's run hangs in a cell: the official
    client gets a 503 in OpenAI's shape, `server_shutting_down` (a status it retries on its own; here retries are
    off), and the server exits. Old behaviour caught: uvicorn's 5 s grace for open connections ran out first and
    the request was cut with a bare 500 (`InternalServerError`, no error object)."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    refusals: list[openai.APIStatusError] = []

    def ask(url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            client.chat.completions.create(model="rlm", messages=[{"role": "user", "content": hang}])
        except openai.APIStatusError as exc:
            refusals.append(exc)

    model = FakeOpenAI(root_model=ROOT_MODEL, root=task_script_root).start()
    try:
        with spawn_server(tmp_path, model_url=model.url) as server:
            asking = threading.Thread(target=ask, args=(server.url,), daemon=True)
            asking.start()
            assert wait_until(lambda: model.stats.root_requests >= 1, timeout=60)  # the run is under way
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(60)
            asking.join(60)
    finally:
        model.stop()
    assert len(refusals) == 1 and refusals[0].status_code == 503
    assert refusals[0].code == "server_shutting_down" and "shutting down" in refusals[0].message


def test_a_request_body_still_arriving_when_the_server_stops_is_answered_503(tmp_path: Path) -> None:
    """SIGTERM while a `/process` body arrives slowly: the request is answered 503 (send it again) and the server
    stops. Old behaviour caught: the body was waited for until uvicorn's grace for open connections ran out (8 s),
    then the request was cut with a bare 500."""
    with spawn_server(tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = "POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}Content-Length: 100000\r\n\r\n".encode() + b'{"prompt": "')
            time.sleep(1)  # the server reads the body, which is far from complete
            server.process.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):  # up to the end of the connection, which the stopping server closes
                answer += chunk
        server.process.wait(60)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"shutting down" in answer


def test_ctrl_c_stops_a_one_process_server_with_status_0(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C in a terminal) to `python backend/main.py` with one process: it stops as uvicorn stops,
    status 0. Mutant caught: uvicorn's server run without catching the KeyboardInterrupt it raises again once it
    has stopped (the process ended by that signal, status -2)."""
    with spawn_server(tmp_path) as server:
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
