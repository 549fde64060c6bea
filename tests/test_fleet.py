"""Several server processes serve one instance (fleet.py): two servers on one PostgreSQL database (replicas), and
`WEB_CONCURRENCY=2` on one SQLite history. Whichever process a request reaches, it follows, cancels and continues
the runs and sessions of the others; a process killed with SIGKILL has its runs end as `lost` for every follower
within RLM_REPLICA_TIMEOUT_S, and nothing else is disturbed. Real servers (`python backend/main.py`), a real
PostgreSQL server (tests/pgserver.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx2
import psycopg
import pytest

from rlm_service.fleet import CLAIMED_WAIT_S
from rlm_service.repl import workspace as workspace_module
from tests.conftest import (
    LiveServer,
    RealServer,
    SseEvent,
    make_settings,
    parse_sse,
    post_process,
    process_alive,
    script,
    spawn_server,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI
from tests.pgserver import PgServer
from tests.test_config import MAIN, clean_env
from tests.test_processes import _listening, _server_processes
from tests.test_runs import follow, start_detached

TIMEOUT_S = 3.0
"""RLM_REPLICA_TIMEOUT_S of these tests."""
NO_DEATH_TIMEOUT_S = 15.0
"""RLM_REPLICA_TIMEOUT_S (its default) of tests in which no replica dies: at TIMEOUT_S a replica whose heartbeat came
late on a loaded machine (two suites at once) can be taken for dead, and its sessions are then reported gone."""
STEPS = script(
    *[{"code": [f"import time\ntime.sleep(0.3)\nprint('step {i}')"]} for i in range(40)],
    {"code": ["answer.update(content='all steps', ready=True)"]},
)
"""A run of 40 short cells: events keep coming for about 15 s."""
HANG = script({"code": ["answer.update(content='started')"]}, {"code": ["import time\ntime.sleep(300)"]})
"""A run that starts its answer, then hangs in its second cell."""
FINISH = "answer.update(content=str({expr}), ready=True)"


@contextmanager
def replicas(tmp_path: Path, url: str, count: int = 2, timeout_s: float = TIMEOUT_S) -> Iterator[list[RealServer]]:
    """`count` servers, each its own process on its own port, on the database at `url`, with RLM_REPLICA_TIMEOUT_S
    `timeout_s`."""
    with ExitStack() as stack:
        servers = []
        for index in range(count):
            cwd = tmp_path / f"replica{index}"
            cwd.mkdir()
            servers.append(
                stack.enter_context(
                    spawn_server(
                        cwd, RLM_DATABASE_URL=url, RLM_MAX_ITERATIONS="100", RLM_REPLICA_TIMEOUT_S=str(timeout_s)
                    )
                )
            )
        yield servers


class Follower(threading.Thread):
    """`GET /api/runs/{id}/events` read in a thread; `events` grows as they come."""

    def __init__(self, url: str, run_id: str, after: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id, self.after = url, run_id, after
        self.events: list[SseEvent] = []
        self.received: list[float] = []
        self.ended_at: float | None = None
        self.status: int | None = None
        self.start()

    def run(self) -> None:
        with (
            httpx2.Client(timeout=120) as client,
            client.stream("GET", f"{self.url}/api/runs/{self.run_id}/events", params={"after": self.after}) as response,
        ):
            self.status = response.status_code
            for event in parse_sse(response.iter_lines()):
                self.events.append(event)
                self.received.append(time.time())
        self.ended_at = time.monotonic()

    def result(self, timeout: float = 60) -> list[SseEvent]:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        return self.events


def test_following_a_live_run_past_its_end_through_another_replica_gets_nothing(pg_url: str, tmp_path: Path) -> None:
    """A client re-attaches through the replica that does not run the run, asking for the events after number
    1000, more than the run will have: its stream ends empty when the run ends, as it does on the run's own
    replica and for a past run. Old behaviour caught (the attack pass): it got an `error` numbered 1001, code
    `lost`, "the run ended without a final event: it is finished", for a run that had finished as usual."""
    slow = script({"code": ["import time\ntime.sleep(2)"]}, {"code": [FINISH.format(expr="1")]})
    with replicas(tmp_path, pg_url) as (one, other):
        run_id = start_detached(one.url, slow, until=lambda event: event.event == "code")[0].data["run_id"]
        follower = Follower(other.url, run_id, after=1000)
        past = follower.result(timeout=60)
        status = _status(one.url, run_id)
    assert follower.status == 200 and past == [], past
    assert status == "finished"


def _second_cell(event: SseEvent) -> bool:
    return event.event == "code" and event.data["iteration"] == 2


def _seqs(events: list[SseEvent]) -> list[int]:
    return [event.data["seq"] for event in events]


def _runs(url: str) -> list[dict[str, Any]]:
    response = httpx2.get(f"{url}/api/runs", timeout=30)
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


def _ask(url: str, prompt: str, **body: Any) -> list[SseEvent]:
    response, events = stream_run(url, json_body={"prompt": prompt, **body})
    assert response.status_code == 200, response.text
    return events


def test_a_run_is_followed_live_and_cancelled_through_another_replica(pg_url: str, tmp_path: Path) -> None:
    """Mutants: the routes without the fleet (the other replica sends what is stored so far and ends, and its
    cancel answers 409); a writer that does not NOTIFY (the follower reads only every few seconds: the events
    reach it late)."""
    with replicas(tmp_path, pg_url) as (one, other):
        first = start_detached(one.url, STEPS, until=lambda event: event.event == "code")
        run_id = first[0].data["run_id"]
        follower = Follower(other.url, run_id, after=first[-1].data["seq"])
        assert wait_until(lambda: sum(event.event == "output" for event in follower.events) >= 6, timeout=30)
        cancelled = httpx2.post(f"{other.url}/api/runs/{run_id}/cancel", timeout=30)
        rest = follower.result()
        late = sorted(received - event.data["ts"] for event, received in zip(rest, follower.received, strict=True))
        again = httpx2.post(f"{other.url}/api/runs/{run_id}/cancel", timeout=30)
        assert wait_until(lambda: _runs(one.url)[0]["status"] == "cancelled", timeout=10)
        listed = (_runs(one.url), _runs(other.url))
        whole_from_one = follow(one.url, run_id)
    assert cancelled.status_code == 202
    print(f"events reached the other replica's follower {late[len(late) // 2]:.3f} s after they were made (median)")
    assert late[len(late) // 2] < 1.0
    whole = first + rest
    assert _seqs(whole) == list(range(1, len(whole) + 1))
    assert [event.event for event in whole].count("error") == 1 and whole[-1].event == "error"
    assert whole[-1].data["code"] == "cancelled" and "cancelled through the API" in whole[-1].data["message"]
    assert [event.data for event in whole_from_one] == [event.data for event in whole]
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    assert listed[0] == listed[1] and listed[0][0]["id"] == run_id


def test_a_cancel_through_another_replica_after_the_run_ended_is_answered_409(pg_url: str, tmp_path: Path) -> None:
    """A run ends with `final` while the history still has it `running` (its row locked here, as a slow database
    would keep it): a cancel through the other replica must not be answered 202, which promises that the run ends
    with `cancelled`. Old behaviour caught: the other replica answered 202 once it had left the command, and the
    run's terminal event stayed `final`."""
    quick = script({"code": ["answer.update(content='done', ready=True)"]})
    with replicas(tmp_path, pg_url) as (one, other), psycopg.connect(pg_url) as db:
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{one.url}/process", json={"prompt": quick}) as response,
        ):
            run_id = response.headers["x-run-id"]
            assert wait_until(lambda: db.execute("SELECT 1 FROM runs WHERE id = %s", (run_id,)).fetchall(), 30)
            db.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (run_id,))  # its end is not written
            events = list(parse_sse(response.iter_lines()))
        cancel = httpx2.post(f"{other.url}/api/runs/{run_id}/cancel", timeout=30)
        db.rollback()
    assert events[-1].event == "final"
    assert cancel.status_code == 409 and "already ended" in cancel.json()["detail"], cancel.text


def test_a_malformed_command_stops_no_later_one(pg_url: str, tmp_path: Path) -> None:
    """A command its target cannot carry out (here a cancel naming no run, as a replica of another version might
    send) is answered 500, one whose payload cannot be read 400, and the next one is carried out. Old behaviour
    caught: the KeyError ended the replica's command loop, silently; the cancel after it was answered 202 and
    never carried out (the run went on). And the unreadable payload failed every reading of the process's
    commands, so none of them was carried out until the sweep removed it (600 s)."""
    with replicas(tmp_path, pg_url) as (one, other), psycopg.connect(pg_url, autocommit=True) as db:
        first = start_detached(one.url, STEPS, until=lambda event: event.event == "code")
        run_id = first[0].data["run_id"]
        ((owner,),) = db.execute("SELECT owner FROM runs WHERE id = %s", (run_id,)).fetchall()
        db.execute(
            "INSERT INTO commands (id, target, kind, payload, created) VALUES ('unreadable', %s, 'cancel', %s, %s), "
            "('bad', %s, 'cancel', '{}', %s)",
            (owner, "{not json", time.time() - 1, owner, time.time()),
        )
        db.execute("SELECT pg_notify('rlm_commands', %s)", (owner,))

        def answers() -> dict[str, Any]:
            rows = db.execute("SELECT id, result FROM commands WHERE id IN ('unreadable', 'bad')").fetchall()
            return {row[0]: json.loads(row[1]) for row in rows if row[1] is not None}

        assert wait_until(lambda: len(answers()) == 2, 30), answers()
        answered = answers()
        cancelled = httpx2.post(f"{other.url}/api/runs/{run_id}/cancel", timeout=30)
        assert wait_until(lambda: _status(one.url, run_id) != "running", timeout=20)
        status = _status(one.url, run_id)
    assert answered["bad"]["status"] == 500 and answered["unreadable"]["status"] == 400, answered
    assert cancelled.status_code == 202 and status == "cancelled"


def test_a_follow_up_and_its_session_are_served_through_another_replica(pg_url: str, tmp_path: Path) -> None:
    """The session lives in one replica's worker; the other streams a follow-up on it, shows it, refuses a
    second follow-up while one runs (409), cancels one whose client left, and ends it; no command is left behind.
    The first follow-up carries an answer schema, which the keeper applies (`answer_json`).
    Mutants: the follow-up route without the fleet (404); a cancel that no one waits for answered by the keeper
    (the answer stayed in the table until the sweep)."""
    first = script(
        {"code": ["records = context.splitlines()\ntotal = sum(int(r) for r in records)"]},
        {"code": [FINISH.format(expr="total")]},
    )
    second = script({"code": [FINISH.format(expr="[len(records), total]")]})
    pair = {"type": "array", "items": {"type": "integer"}}  # checked by the replica that took the request
    slow = script({"code": ["import time\ntime.sleep(3)"]}, {"code": [FINISH.format(expr="1")]})
    with replicas(tmp_path, pg_url) as (one, other):
        started = _ask(one.url, first, input_data="\n".join(str(i) for i in range(100)), settings={"session": True})
        session_id = started[0].data["session_id"]
        follow_up = _ask(other.url, second, session_id=session_id, settings={"answer_schema": pair})
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{other.url}/process", json={"prompt": slow, "session_id": session_id}) as live,
        ):
            lines = live.iter_lines()
            next(lines)
            busy = post_process(other.url, json={"prompt": "x", "session_id": session_id})
            busy_delete = httpx2.delete(f"{other.url}/api/sessions/{session_id}", timeout=30)
            slow_events = list(parse_sse(lines))
        described = httpx2.get(f"{other.url}/api/sessions/{session_id}", timeout=30).json()
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{other.url}/process", json={"prompt": HANG, "session_id": session_id}) as left,
        ):
            left_id = left.headers["x-run-id"]
            next(left.iter_lines())
        # the client left: its run is cancelled through the keeper, which waits for no answer
        assert wait_until(lambda: _status(one.url, left_id) == "cancelled", timeout=30)
        deleted = httpx2.delete(f"{other.url}/api/sessions/{session_id}", timeout=30)
        gone_here = httpx2.get(f"{one.url}/api/sessions/{session_id}", timeout=30)
        gone_there = post_process(other.url, json={"prompt": "x", "session_id": session_id})
        unknown = post_process(other.url, json={"prompt": "x", "session_id": "s0000000000000000"})
        with psycopg.connect(pg_url) as db:  # each command removed once carried out (not only when the servers stop)
            commands = db.execute("SELECT kind, result FROM commands").fetchall()
    assert not commands
    assert started[-1].data["answer"] == str(sum(range(100)))
    assert follow_up[0].event == "start" and follow_up[0].data["session_id"] == session_id
    assert follow_up[-1].event == "final" and follow_up[-1].data["answer_json"] == [100, 4950]
    assert _seqs(follow_up) == list(range(1, len(follow_up) + 1))
    assert busy.status_code == 409 and "still going" in busy.json()["detail"]
    assert busy_delete.status_code == 409 and slow_events[-1].event == "final"
    assert described["runs"][:2] == [started[0].data["run_id"], follow_up[0].data["run_id"]]
    assert len(described["runs"]) == 3 and described["live_run"] is None
    assert deleted.status_code == 204 and gone_here.status_code == 404 and gone_there.status_code == 404
    assert unknown.status_code == 404
    # worded as one process words it, with the idle time configured
    assert "ended after 1800 s idle (RLM_SESSION_IDLE_S)" in unknown.json()["detail"]


def test_a_session_ended_through_another_replica_is_answered_while_its_files_are_still_being_removed(
    pg_url: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas (in this process, to hold the removal of the session's workspace as a large one takes
    seconds): the session is ended through the replica that does not keep it, and while its keeper still removes
    its files the DELETE is answered 204, the session is gone whichever replica is asked, and the keeper carries
    out the next command (a cancel of one of its runs, sent through the other replica). The worker is ended, and
    once the removal goes on the files are gone. Old behaviour caught (the review): the keeper's one command loop
    waited for the worker and the files; the replica asking gave up after 10 s and, finding the session's row gone,
    answered the DELETE 404 "no session … it never existed", and the cancel waited too."""
    where = script({"code": ["import os\nprint(os.getpid(), os.getcwd())"]}, {"code": [FINISH.format(expr="1")]})
    entered, release = threading.Event(), threading.Event()
    remove_tree = workspace_module.remove_tree
    workdir: list[Path] = []

    def held(path: Path) -> None:
        if workdir and workdir[0].is_relative_to(path):
            entered.set()
            release.wait(60)
        remove_tree(path)

    monkeypatch.setattr(workspace_module, "remove_tree", held)
    settings = make_settings(fake, rlm_database_url=pg_url, rlm_replica_timeout_s=TIMEOUT_S)
    with LiveServer(settings) as keeper, LiveServer(settings) as other:
        try:
            events = _ask(keeper.url, where, input_data="abc", settings={"session": True})
            session_id = events[0].data["session_id"]
            pid, cwd = next(e for e in events if e.event == "output").data["stdout"].split()
            workdir.append(Path(cwd))
            hanging = start_detached(keeper.url, HANG, until=_second_cell)[0].data["run_id"]
            deleted = httpx2.delete(f"{other.url}/api/sessions/{session_id}", timeout=30)
            assert deleted.status_code == 204, deleted.text
            for url in (keeper.url, other.url):
                assert httpx2.get(f"{url}/api/sessions/{session_id}", timeout=30).status_code == 404
            cancelled = httpx2.post(f"{other.url}/api/runs/{hanging}/cancel", timeout=30)
            assert cancelled.status_code == 202, cancelled.text
            assert wait_until(lambda: _status(keeper.url, hanging) == "cancelled", timeout=15)
            # all of the above before the session's files were removed: its worker is ended first, then they go
            assert entered.wait(15) and Path(cwd).exists() and not process_alive(int(pid))
        finally:
            release.set()
        assert wait_until(lambda: not Path(cwd).exists(), timeout=15)


def _status(url: str, run_id: str) -> str:
    response = httpx2.get(f"{url}/api/runs/{run_id}", timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["run"]["status"])


def test_a_follow_up_given_up_on_is_not_started_late_and_the_retry_is_served(pg_url: str, tmp_path: Path) -> None:
    """A follow-up through the other replica, whose command the keeper of the session takes and then does not
    answer (here: the keeper is stopped with SIGSTOP, and the command marked taken for it): the asking replica
    answers 503 after ANSWER_WAIT_S twice. The keeper, resumed, must not start that follow-up (no one would follow
    or cancel its run, and the session would be busy with it); the client's retry is served. Mutant caught: `_ask`
    giving up without removing the command (the keeper started it late: the retry got 409)."""
    hang = script({"code": ["import time\ntime.sleep(300)"]})
    with ExitStack() as stack:
        keeper, other = (
            stack.enter_context(spawn_server(tmp_path / name, RLM_DATABASE_URL=pg_url, RLM_REPLICA_TIMEOUT_S="60"))
            for name in ("keeper", "other")
            if (tmp_path / name).mkdir() is None
        )
        started = _ask(
            keeper.url, script({"code": [FINISH.format(expr="1")]}), input_data="abc", settings={"session": True}
        )
        session_id = started[0].data["session_id"]
        answered: list[httpx2.Response] = []
        keeper.process.send_signal(signal.SIGSTOP)
        try:
            asking = threading.Thread(
                target=lambda: answered.append(post_process(other.url, json={"prompt": hang, "session_id": session_id}))
            )
            asking.start()
            with psycopg.connect(pg_url, autocommit=True) as db:
                taken = "UPDATE commands SET taken = 0 WHERE kind = 'follow_up' AND taken IS NULL"
                assert wait_until(lambda: db.execute(taken).rowcount > 0, timeout=30)
                asking.join(60)
                db.execute("UPDATE commands SET taken = NULL WHERE kind = 'follow_up'")  # for the keeper to carry out
        finally:
            keeper.process.send_signal(signal.SIGCONT)
        retry = _ask(other.url, script({"code": [FINISH.format(expr="len(context)")]}), session_id=session_id)
    assert answered[0].status_code == 503 and "did not answer" in answered[0].json()["detail"]
    assert retry[-1].event == "final" and retry[-1].data["answer"] == "3"


def test_a_claimed_follow_up_whose_answer_never_comes_is_given_up_on(pg_url: str, tmp_path: Path) -> None:
    """The test plays the process keeping a session (alive: its heartbeat is kept fresh): it takes the follow-up's
    command and claims it (its run is starting), then never answers, as when its answer cannot be written. The
    asking replica answers its client 503 after CLAIMED_WAIT_S and removes the command, so that a late answer
    finds no one waiting (and the keeper cancels the run). Old behaviour caught (the review): the asker waited for
    the claimed command until the sweep removed it, 600 s later."""
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    with replicas(tmp_path, pg_url, count=1) as (asker,), psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(f"INSERT INTO processes (id, host, pid, started, heartbeat) VALUES ('keeper', 'x', 1, {now}, {now})")
        db.execute(
            "INSERT INTO sessions (id, owner, created, last_used, runs, input_chars, input_lines) "
            "VALUES ('s0123456789abcde', 'keeper', 0, 0, '[]', 0, 0)"
        )
        alive = threading.Event()

        def heartbeat() -> None:
            with psycopg.connect(pg_url, autocommit=True) as beats:
                while not alive.wait(0.5):
                    beats.execute(f"UPDATE processes SET heartbeat = {now} WHERE id = 'keeper'")

        beating = threading.Thread(target=heartbeat, daemon=True)
        beating.start()
        answered: list[httpx2.Response] = []
        began = time.monotonic()
        asking = threading.Thread(
            target=lambda: answered.append(
                httpx2.post(f"{asker.url}/process", json={"prompt": "x", "session_id": "s0123456789abcde"}, timeout=60)
            )
        )
        asking.start()
        claimed: list[str] = []

        def claim() -> bool:
            taken = "UPDATE commands SET taken = 0, result = '{\"status\": 102}' WHERE target = 'keeper' RETURNING id"
            claimed.extend(row[0] for row in db.execute(taken).fetchall())
            return bool(claimed)

        assert wait_until(claim, timeout=30)
        asking.join(45)
        waited = time.monotonic() - began
        late = db.execute("UPDATE commands SET result = '{\"status\": 200}' WHERE id = %s", (claimed[0],)).rowcount
        alive.set()
        beating.join(5)
    assert answered and answered[0].status_code == 503 and "did not answer" in answered[0].json()["detail"]
    assert CLAIMED_WAIT_S <= waited < CLAIMED_WAIT_S + 15 and late == 0


def test_a_replica_killed_mid_run_ends_its_runs_as_lost_for_every_follower(pg_url: str, tmp_path: Path) -> None:
    """SIGKILL of the replica that runs a run: the follower on the other replica gets `error` code `lost`
    within RLM_REPLICA_TIMEOUT_S, with the answer the run had started; the run is listed as `lost`; the dead
    replica's session is reported gone; a cancel sent through the survivor just after the kill is answered 409
    (the run ended `lost`, not `cancelled`); the other replica's own run goes on to its end. Mutant: no sweeper
    (the follower waits on, the run stays `running`). Old behaviour caught: the cancel was answered 202."""
    with replicas(tmp_path, pg_url) as (doomed, survivor):
        hung = start_detached(doomed.url, HANG, until=_second_cell)
        run_id = hung[0].data["run_id"]
        kept = _ask(doomed.url, script({"code": [FINISH.format(expr="1")]}), input_data="x", settings={"session": True})
        session_id = kept[0].data["session_id"]
        assert httpx2.get(f"{survivor.url}/api/sessions/{session_id}", timeout=30).status_code == 200
        own = start_detached(survivor.url, STEPS, until=lambda event: event.event == "code")
        follower = Follower(survivor.url, run_id, after=hung[-1].data["seq"])
        assert wait_until(lambda: follower.status == 200, timeout=10)
        time.sleep(TIMEOUT_S / 2)  # the doomed replica's heartbeat is fresh
        os.kill(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            cancel = pool.submit(httpx2.post, f"{survivor.url}/api/runs/{run_id}/cancel", timeout=60)
            rest = follower.result(timeout=TIMEOUT_S + 30)
            cancelled = cancel.result()
        assert follower.ended_at is not None
        took = follower.ended_at - killed
        session = httpx2.get(f"{survivor.url}/api/sessions/{session_id}", timeout=30)
        follow_up = post_process(survivor.url, json={"prompt": "x", "session_id": session_id})
        own_rest = follow(survivor.url, own[0].data["run_id"], after=own[-1].data["seq"])
        listed = {run["id"]: run for run in _runs(survivor.url)}
    print(f"the follower heard of the death {took:.2f} s after the kill")
    assert took <= TIMEOUT_S
    assert [event.event for event in rest] == ["error"] and rest[0].data["code"] == "lost"
    assert "died" in rest[0].data["message"] and rest[0].data["answer"] == "started"
    assert rest[0].data["seq"] == hung[-1].data["seq"] + 1
    assert listed[run_id]["status"] == "lost" and listed[run_id]["error"]["code"] == "lost"
    assert cancelled.status_code == 409 and "already ended" in cancelled.json()["detail"], cancelled.text
    assert session.status_code == 404 and "died" in session.json()["detail"]
    assert follow_up.status_code == 404 and "died" in follow_up.json()["detail"]
    assert own_rest[-1].event == "final" and own_rest[-1].data["answer"] == "all steps"
    assert listed[own[0].data["run_id"]]["status"] == "finished"


def test_a_restart_of_postgresql_under_two_replicas_loses_nothing(own_pg_server: PgServer, tmp_path: Path) -> None:
    """PostgreSQL stops for longer than RLM_REPLICA_TIMEOUT_S while one replica runs a run that the other
    follows: the follower gets every event and the final one once the database is back, no run or replica is
    taken for dead, and both go on serving each other's runs. Mutant: a sweeper that does not wait for its own
    heartbeats after an outage (the first replica back ends the other's run as `lost`)."""
    url = own_pg_server.create_database()
    with replicas(tmp_path, url) as (one, other):
        time.sleep(TIMEOUT_S)  # both sweep
        first = start_detached(one.url, STEPS, until=lambda event: event.event == "code")
        run_id = first[0].data["run_id"]
        follower = Follower(other.url, run_id, after=first[-1].data["seq"])
        assert wait_until(lambda: sum(event.event == "output" for event in follower.events) >= 2, timeout=20)
        registered = _processes(url)
        own_pg_server.stop()
        time.sleep(TIMEOUT_S * 1.5)
        own_pg_server.start()
        rest = follower.result(timeout=90)
        assert httpx2.get(f"{one.url}/health").json() == {"status": "ok"}
        time.sleep(TIMEOUT_S * 1.5)  # every sweeper has had its turn
        again = start_detached(one.url, script({"code": [FINISH.format(expr="2")]}), until=lambda event: False)
        followed_again = follow(other.url, again[0].data["run_id"])
        assert wait_until(lambda: [run["status"] for run in _runs(other.url)] == ["finished", "finished"], 30)
        still = _processes(url)
    assert len(registered) == 2 and still == registered  # neither was taken for dead
    whole = first + rest
    assert _seqs(whole) == list(range(1, len(whole) + 1))
    assert whole[-1].event == "final" and whole[-1].data["answer"] == "all steps"
    assert followed_again[-1].event == "final"


def _processes(url: str) -> set[str]:
    """The ids of the processes registered in the database."""
    with psycopg.connect(url) as db:
        return {row[0] for row in db.execute("SELECT id FROM processes").fetchall()}


def test_a_replica_taken_for_dead_while_alive_stops_its_runs_and_goes_on(pg_url: str, tmp_path: Path) -> None:
    """A replica frozen (SIGSTOP) for longer than RLM_REPLICA_TIMEOUT_S is taken for dead: its run ends as `lost`
    for the other replica's follower. Once it runs again it finds out, cancels the run for its own followers and
    registers anew; the history keeps the one terminal event, `lost`, and nothing after it; the replica serves
    new runs. Mutant: a shared store that writes events whatever the run's status (the frozen replica's later
    events and its `cancelled` are stored after `lost`)."""
    with replicas(tmp_path, pg_url) as (frozen, other):
        time.sleep(TIMEOUT_S)  # both sweep
        first = start_detached(frozen.url, STEPS, until=lambda event: event.event == "code")
        run_id = first[0].data["run_id"]
        local = Follower(frozen.url, run_id, after=first[-1].data["seq"])
        remote = Follower(other.url, run_id, after=first[-1].data["seq"])
        assert wait_until(lambda: sum(event.event == "output" for event in remote.events) >= 2, timeout=20)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            time.sleep(TIMEOUT_S * 1.5)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        seen_remote, seen_local = remote.result(), local.result()
        stored = follow(other.url, run_id)
        again = _ask(frozen.url, script({"code": [FINISH.format(expr="3")]}))
        followed_again = follow(other.url, again[0].data["run_id"])
    assert seen_remote[-1].event == "error" and seen_remote[-1].data["code"] == "lost"
    assert seen_local[-1].event == "error" and seen_local[-1].data["code"] == "cancelled"
    assert "taken for dead" in seen_local[-1].data["message"]
    assert [event.event for event in stored].count("error") == 1 and stored[-1].data == seen_remote[-1].data
    assert _seqs(stored) == list(range(1, len(stored) + 1))
    assert again[-1].event == "final" and followed_again[-1].data["answer"] == "3"


def _answering_process(processes: list[int], response: httpx2.Response) -> int | None:
    """Which of the server processes holds the other end of the response's connection."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == client_port:
                    inodes.add(fields[9])
    for pid in processes:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def _follow_a_little(url: str, run_id: str, after: int, processes: list[int]) -> tuple[int | None, list[SseEvent]]:
    """Re-attach on a new connection, read one event, leave; and which process answered."""
    with (
        httpx2.Client(timeout=30) as client,
        client.stream("GET", f"{url}/api/runs/{run_id}/events", params={"after": after}) as response,
    ):
        assert response.status_code == 200, response.read()
        pid = _answering_process(processes, response)
        events = []
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            break
        return pid, events


def test_with_two_processes_on_sqlite_a_run_is_followed_and_cancelled_whichever_answers(tmp_path: Path) -> None:
    """WEB_CONCURRENCY=2 on one port: clients re-attach again and again (the kernel hands each connection to
    either process) until both processes have served the run; every re-attachment continues where the last
    left off; deleting it is refused while it runs (409, whichever process answers: it would go on and write
    into the history it was deleted from); the cancel ends it, and then it can be deleted. Mutants: the routes
    without the fleet (the process that does not run it sends what is stored, without the live rest, or 404);
    the delete without its check of the run's status (204 at once, and the follower was told `lost`)."""
    with spawn_server(
        tmp_path, WEB_CONCURRENCY="2", RLM_MAX_ITERATIONS="100", RLM_REPLICA_TIMEOUT_S=str(TIMEOUT_S)
    ) as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        processes = _server_processes(server.pid)
        seen = start_detached(server.url, STEPS, until=lambda event: event.event == "code")
        run_id = seen[0].data["run_id"]
        answered: set[int | None] = set()
        for _ in range(40):
            pid, events = _follow_a_little(server.url, run_id, seen[-1].data["seq"], processes)
            answered.add(pid)
            seen += events
            if answered >= set(processes):
                break
        kept = [httpx2.delete(f"{server.url}/api/runs/{run_id}", timeout=30) for _ in range(6)]
        cancelled = httpx2.post(f"{server.url}/api/runs/{run_id}/cancel", timeout=30)
        rest = follow(server.url, run_id, after=seen[-1].data["seq"])
        late = [httpx2.post(f"{server.url}/api/runs/{run_id}/cancel", timeout=30).status_code for _ in range(6)]
        deleted = httpx2.delete(f"{server.url}/api/runs/{run_id}", timeout=30)
    assert answered == set(processes)
    assert [response.status_code for response in kept] == [409] * 6, kept[0].text
    assert "cancel it first" in kept[0].json()["detail"]
    whole = seen + rest
    assert _seqs(whole) == list(range(1, len(whole) + 1))
    assert cancelled.status_code == 202 and whole[-1].event == "error" and whole[-1].data["code"] == "cancelled"
    assert late == [409] * 6  # whichever process answers: the run truly ended
    assert deleted.status_code == 204


def _owner_of(run_events: list[SseEvent]) -> int:
    """The server process that runs a run whose first cell printed its worker's parent (the zygote)."""
    zygote = int(next(event for event in run_events if event.event == "output").data["stdout"].split()[0])
    with open(f"/proc/{zygote}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_with_two_processes_on_sqlite_a_killed_process_ends_its_runs_as_lost(tmp_path: Path) -> None:
    """SIGKILL of one of two server processes, each running a run: a client that re-attaches to the killed
    one's run (reaching the other process) gets `error` code `lost` within RLM_REPLICA_TIMEOUT_S of the kill,
    and the other's run goes on to its end, as the process started in the dead one's place finds it. Mutants: no
    sweeper (the follower waits on); a store that marks every `running` run `unfinished` when a process opens
    it (the survivor's run is listed `unfinished`)."""
    where = script(
        {"code": ["import os\nprint(os.getppid())\nanswer.update(content='started')"]},
        {"code": ["import time\ntime.sleep(6)"]},
        {"code": [FINISH.format(expr="'survived'")]},
    )
    with spawn_server(tmp_path, WEB_CONCURRENCY="2", RLM_REPLICA_TIMEOUT_S=str(TIMEOUT_S)) as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        time.sleep(TIMEOUT_S)  # a process sweeps once its own heartbeats have gone through for that long
        latest: dict[int, list[SseEvent]] = {}
        for _ in range(30):  # until each process runs one (the kernel picks one at random: 12 tries once missed)
            seen = start_detached(server.url, where, until=_second_cell)
            latest[_owner_of(seen)] = seen
            if len(latest) == 2:
                break
        assert set(latest) == set(_server_processes(server.pid))
        doomed, survivor = latest.values()
        os.kill(_owner_of(doomed), signal.SIGKILL)
        killed, killed_at = time.monotonic(), time.time()
        rest: list[SseEvent] = []
        while (not rest or rest[-1].event not in ("final", "error")) and time.monotonic() < killed + 60:
            try:
                rest += follow(server.url, doomed[0].data["run_id"], after=(rest or doomed)[-1].data["seq"])
            except httpx2.TransportError:
                time.sleep(0.05)  # the dead process's last connections
        took = time.monotonic() - killed
        survived = follow(server.url, survivor[0].data["run_id"], after=survivor[-1].data["seq"])
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        wanted = {doomed[0].data["run_id"]: "lost", survivor[0].data["run_id"]: "finished"}
        assert wait_until(
            lambda: {run["id"]: run["status"] for run in _runs(server.url) if run["id"] in wanted} == wanted, timeout=10
        )
    declared = rest[-1].data["ts"] - killed_at
    print(f"the follower heard of the death {took:.2f} s after the kill (declared {declared:.2f} s after it)")
    assert rest[-1].event == "error" and rest[-1].data["code"] == "lost" and rest[-1].data["answer"] == "started"
    assert took <= TIMEOUT_S
    assert survived[-1].event == "final" and survived[-1].data["answer"] == "survived"


def test_with_two_processes_a_new_session_ends_the_longest_idle_one_whichever_process_keeps_it(tmp_path: Path) -> None:
    """RLM_MAX_SESSIONS=1 with two processes: new sessions are asked for one after another, each with the
    instance's one session idle, until one lands on the process that does not keep it. Every one is kept (the
    idle one ends to make room, as with one process), and the instance keeps one session. Old behaviour caught:
    a process ended only sessions of its own to make room, so a new session that reached the other process was
    refused with 429 'none is idle' (7 of 11 requests in a row, measured)."""
    finish = script({"code": [FINISH.format(expr="1")]})
    body = {"prompt": finish, "input_data": "x", "settings": {"session": True}}
    database = tmp_path / "history.sqlite3"
    with spawn_server(tmp_path, WEB_CONCURRENCY="2", RLM_MAX_SESSIONS="1", RLM_REPLICA_TIMEOUT_S="5") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        keepers: list[str] = []
        for _ in range(30):  # the kernel hands each connection to either process
            response, events = stream_run(server.url, json_body=body)
            assert response.status_code == 200, response.text
            assert events[-1].event == "final"
            idle = [(events[0].data["session_id"], ANY, None)]  # recorded as idle: the next may end it
            assert wait_until(lambda: _rows(database, "SELECT id, owner, live_run FROM sessions") == idle)  # noqa: B023
            keepers.append(_rows(database, "SELECT owner FROM sessions")[0][0])
            if len(set(keepers)) == 2:
                break
        kept = httpx2.get(f"{server.url}/api/sessions/{events[0].data['session_id']}", timeout=30)
    assert len(set(keepers)) == 2
    assert kept.status_code == 200


def test_with_two_processes_a_refused_request_ends_no_idle_session(tmp_path: Path) -> None:
    """RLM_MAX_SESSIONS=1 with two processes and the instance's one session idle: new sessions asked for with a
    setting above the server's limit are refused (422) whichever process they reach, and the idle session is
    still there. Mutant caught: room made before the request is checked (the other process's idle session was
    ended for a request then refused)."""
    finish = script({"code": [FINISH.format(expr="1")]})
    database = tmp_path / "history.sqlite3"
    with spawn_server(tmp_path, WEB_CONCURRENCY="2", RLM_MAX_SESSIONS="1", RLM_MAX_ITERATIONS="5") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        _, events = stream_run(server.url, json_body={"prompt": finish, "settings": {"session": True}})
        session_id = events[0].data["session_id"]
        assert wait_until(lambda: _rows(database, "SELECT id, live_run FROM sessions") == [(session_id, None)])
        too_much = {"prompt": finish, "settings": {"session": True, "max_iterations": 50}}
        refused = [post_process(server.url, json=too_much).status_code for _ in range(8)]  # each may reach either
        kept = httpx2.get(f"{server.url}/api/sessions/{session_id}", timeout=30)
    assert refused == [422] * 8
    assert kept.status_code == 200


def _rows(database: Path, query: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database)) as db:
        return db.execute(query).fetchall()


def test_several_processes_without_history_are_refused_at_start_with_one_line(tmp_path: Path) -> None:
    """The processes find each other's runs and sessions in the history: without it they could not."""
    result = subprocess.run(
        [sys.executable, str(MAIN)],
        env=clean_env(WEB_CONCURRENCY="2", RLM_HISTORY_DB="off"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("Configuration error: WEB_CONCURRENCY: more than one process needs the run history")


def test_one_process_alone_on_its_history_coordinates_with_nobody(tmp_path: Path) -> None:
    """With one process and the SQLite history (the default), nothing of the fleet runs: no process registers,
    no session row is written, runs have no owner. Mutant: a fleet started whatever the configuration."""
    with spawn_server(tmp_path) as server:
        events = _ask(
            server.url, script({"code": [FINISH.format(expr="1")]}), input_data="x", settings={"session": True}
        )
        assert (
            events[-1].event == "final"
            and httpx2.get(f"{server.url}/api/sessions/{events[0].data['session_id']}").status_code == 200
        )
        with closing(sqlite3.connect(tmp_path / "history.sqlite3")) as db:
            found = [db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("processes", "sessions")]
            owners = db.execute("SELECT owner FROM runs").fetchall()
    assert found == [0, 0] and owners == [(None,)]


def test_a_replica_stopped_cleanly_cancels_its_runs_and_leaves_no_rows(pg_url: str, tmp_path: Path) -> None:
    """SIGTERM to a replica: its live run ends `cancelled` for the other replica's follower (not `lost` a
    timeout later), and the database keeps no row of it: no process, no session. Mutant: a stop that leaves
    its rows (the other finds it only when its heartbeat is old, and ends its session as lost)."""
    stopping_dir, staying_dir = tmp_path / "stopping", tmp_path / "staying"
    stopping_dir.mkdir()
    staying_dir.mkdir()
    env = {"RLM_DATABASE_URL": pg_url, "RLM_MAX_ITERATIONS": "100", "RLM_REPLICA_TIMEOUT_S": str(TIMEOUT_S)}
    with spawn_server(staying_dir, **env) as staying:
        with spawn_server(stopping_dir, **env) as stopping:
            kept = _ask(
                stopping.url, script({"code": [FINISH.format(expr="1")]}), input_data="x", settings={"session": True}
            )
            first = start_detached(stopping.url, STEPS, until=lambda event: event.event == "code")
            follower = Follower(staying.url, first[0].data["run_id"], after=first[-1].data["seq"])
            assert wait_until(lambda: len(follower.events) >= 2, timeout=20)
        stopped = time.monotonic()
        rest = follower.result(timeout=30)
        assert follower.ended_at is not None and follower.ended_at - stopped < TIMEOUT_S
        with psycopg.connect(pg_url) as db:
            processes = db.execute("SELECT COUNT(*) FROM processes").fetchone()
            sessions = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
        gone = httpx2.get(f"{staying.url}/api/sessions/{kept[0].data['session_id']}", timeout=30)
    assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled"
    assert "shutting down" in rest[-1].data["message"]
    assert processes == (1,) and sessions == (0,)
    assert gone.status_code == 404 and "died" not in gone.json()["detail"]
