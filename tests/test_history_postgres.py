"""The service on PostgreSQL (`RLM_DATABASE_URL`), over real HTTP against a real PostgreSQL server: one history
for every server on the database, and a restart of PostgreSQL in the middle of runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import psycopg
import pytest

from rlm_service import store_postgres
from rlm_service.store import StoreUnavailable
from rlm_service.store_postgres import PostgresRunStore
from tests.conftest import LiveServer, SseEvent, make_settings, parse_sse, run_record, script, stream_run, wait_until
from tests.fake_openai import FakeOpenAI
from tests.pgserver import PgServer


def _stored_stream(url: str, run_id: str) -> list[SseEvent]:
    """`GET /api/runs/{id}/events`, read to its end."""
    with httpx2.Client(timeout=30) as client, client.stream("GET", f"{url}/api/runs/{run_id}/events") as response:
        assert response.status_code == 200, response.read()
        return list(parse_sse(response.iter_lines()))


def _shape(events: list[SseEvent]) -> list[tuple[str, int]]:
    return [(event.event, event.data["seq"]) for event in events]


def _runs(url: str) -> list[dict[str, Any]]:
    response = httpx2.get(f"{url}/api/runs", timeout=30)
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


def test_two_servers_on_one_database_keep_one_history(pg_url: str, fake: FakeOpenAI) -> None:
    """Two servers (replicas) on one database: runs made through either are listed the same by both, and each
    serves the other's ended runs: their events, their kept input, their deletion."""
    settings = make_settings(fake, rlm_database_url=pg_url)
    keep = script({"code": ["answer.update(content=context, ready=True)"]})
    with LiveServer(settings) as one, LiveServer(settings) as other:
        assert httpx2.get(f"{other.url}/api/config").json()["history"] is True
        _, kept = stream_run(
            one.url, json_body={"prompt": keep, "input_data": "keep me ✓" * 1000, "settings": {"keep_input": True}}
        )
        _, plain = stream_run(other.url, json_body={"prompt": "task", "input_data": "data"})
        kept_id, plain_id = kept[0].data["run_id"], plain[0].data["run_id"]
        assert kept[-1].event == "final" and plain[-1].event == "final"
        assert wait_until(lambda: [run["status"] for run in _runs(one.url)] == ["finished", "finished"], 10)
        assert [run["id"] for run in _runs(one.url)] == [plain_id, kept_id]
        assert _runs(one.url) == _runs(other.url)

        assert _shape(_stored_stream(other.url, kept_id)) == _shape(kept)
        assert _stored_stream(other.url, kept_id)[-1].data["answer"] == "keep me ✓" * 1000
        assert _shape(_stored_stream(one.url, plain_id)) == _shape(plain)
        kept_input = httpx2.get(f"{other.url}/api/runs/{kept_id}/input")
        assert kept_input.status_code == 200 and kept_input.text == "keep me ✓" * 1000
        assert httpx2.get(f"{one.url}/api/runs/{plain_id}/input").status_code == 404

        assert httpx2.delete(f"{other.url}/api/runs/{kept_id}").status_code == 204
        assert httpx2.get(f"{one.url}/api/runs/{kept_id}").status_code == 404
        # the replica that ran it keeps its events in memory a while: not to be served once deleted (old: 200)
        assert httpx2.get(f"{one.url}/api/runs/{kept_id}/events").status_code == 404
        assert httpx2.post(f"{one.url}/api/runs/{kept_id}/cancel").status_code == 404  # not 409, "already ended"
        assert httpx2.get(f"{one.url}/api/runs/{kept_id}/input").status_code == 404


def test_a_restart_of_postgresql_mid_run_loses_no_event(own_pg_server: PgServer, fake: FakeOpenAI) -> None:
    """PostgreSQL stops while a run is in a cell and stays down while it ends and while another run is made:
    both runs end as usual, the history answers 503 (not 500) meanwhile, and once PostgreSQL is back both
    runs are in the history with every event they streamed, as is the next run. Mutants: `PgDb.transient`
    calling nothing transient (the writes during the outage are dropped: the runs stay `running`); `transient`
    calling nothing transient (reads answer 500 during the outage)."""
    url = own_pg_server.create_database()
    slow = script(
        {"code": ["import time\ntime.sleep(2)\nprint('slept')"]},
        {"code": ["answer.update(content='done', ready=True)"]},
    )
    with LiveServer(make_settings(fake, rlm_database_url=url)) as server:
        assert _runs(server.url) == []  # the pool's connection is made before the restart
        streamed = []
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": slow}) as response,
        ):
            for event in parse_sse(response.iter_lines()):
                streamed.append(event)
                if event.event == "code" and len(streamed) < 4:
                    own_pg_server.stop()
        assert streamed[-1].event == "final" and streamed[-1].data["answer"] == "done"
        down = httpx2.get(f"{server.url}/api/runs", timeout=30)
        assert down.status_code == 503 and "cannot be read now" in down.json()["detail"]
        _, during = stream_run(server.url, json_body={"prompt": "task", "input_data": "made while it was down"})
        assert during[-1].event == "final"
        assert httpx2.get(f"{server.url}/health").json() == {"status": "ok"}

        own_pg_server.start()
        assert httpx2.get(f"{server.url}/api/runs", timeout=30).status_code == 200
        started = time.monotonic()
        ids = [during[0].data["run_id"], streamed[0].data["run_id"]]
        assert wait_until(
            lambda: (
                [(run["id"], run["status"]) for run in _runs(server.url)]
                == [(ids[0], "finished"), (ids[1], "finished")]
            ),
            30,
        )
        print(f"recorded again {time.monotonic() - started:.1f} s after PostgreSQL was back")
        assert _shape(_stored_stream(server.url, ids[1])) == _shape(streamed)
        assert _shape(_stored_stream(server.url, ids[0])) == _shape(during)

        _, after = stream_run(server.url, json_body={"prompt": "task", "input_data": "made after"})
        assert wait_until(lambda: _runs(server.url)[0]["status"] == "finished", 10)
        assert _shape(_stored_stream(server.url, after[0].data["run_id"])) == _shape(after)


def test_the_first_read_after_a_restart_of_postgresql_succeeds(own_pg_server: PgServer) -> None:
    """The read pool's connections die with the server; the first read after it is back gets a new one. Mutant:
    the pool without `check` (that read answers `StoreUnavailable`)."""
    store = PostgresRunStore(own_pg_server.create_database())
    try:
        assert store.list(limit=1, before=None) == []
        own_pg_server.stop()
        own_pg_server.start()
        assert store.list(limit=1, before=None) == [] and store.status("0123456789abcdef") is None
    finally:
        store.close()


def test_a_database_that_cannot_be_reached_at_start_is_named_without_its_password() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://rlm:hunter2@127.0.0.1:{sock.getsockname()[1]}/rlm"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"^RLM_DATABASE_URL: the database cannot be reached") as error:
        PostgresRunStore(url, start_wait_s=1.5)
    assert time.monotonic() - started >= 1.5 and "hunter2" not in str(error.value)


def test_a_read_that_waits_for_a_lock_is_refused_in_seconds(pg_url: str) -> None:
    """Another client holds a lock on `runs` (as a migration, `VACUUM FULL` or an administrator's `LOCK TABLE`
    does) for up to 60 s: a history read gives up with `StoreUnavailable` after the read pool's timeout, as a
    read on SQLite does after its busy timeout, rather than waiting as long as the lock is held. Old behaviour
    caught: reads (listing, a run, its events, a cancel's lookup) waited for the lock, 15 s of 15 s held
    measured over HTTP."""
    store = PostgresRunStore(pg_url)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(store.list(limit=1, before=None))
        except StoreUnavailable as exc:
            outcome.append(exc)

    try:
        assert store.list(limit=1, before=None) == []
        with psycopg.connect(pg_url) as holder:
            holder.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
            reader = threading.Thread(target=read)
            reader.start()
            reader.join(60)
        reader.join(30)
        assert store.list(limit=1, before=None) == []  # the connection serves again once the lock is gone
    finally:
        store.close()
    (refused,) = outcome
    assert isinstance(refused, StoreUnavailable) and "LockNotAvailable" in str(refused)


@contextlib.contextmanager
def _frozen(server: PgServer) -> Iterator[None]:
    """The PostgreSQL server's processes stopped (SIGSTOP) while the block runs: it keeps its connections and
    answers nothing, as behind a network that drops packets."""
    processes = server.processes()
    for pid in processes:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)


class _Run(threading.Thread):
    """A run that keeps nothing (`stream_run`) in a thread of its own; its events once it has ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[SseEvent] = []
        self.start()

    def run(self) -> None:
        self.events = stream_run(self.url, json_body={"prompt": "task", "input_data": "during"})[1]


def test_runs_go_on_while_a_frozen_postgresql_holds_history_reads(
    own_pg_server: PgServer, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops answering without closing its connections, and 40 history reads arrive, more than the
    event loop's default threads (at most 32), each waiting for the database (a read waits up to a minute here
    for one of the read pool's connections): a new run meanwhile starts and ends `final` before any read has
    come back, and the reads are answered once the database is back. Old behaviour caught: the reads ran in the
    default threads and held them all, and the run, whose workspace is made in one of them, waited for them (19 s
    with 24 reads during a 20 s freeze, measured with the pool's usual 5 s)."""
    monkeypatch.setattr(store_postgres, "READ_TIMEOUT_S", 60)
    with LiveServer(make_settings(fake, rlm_database_url=own_pg_server.create_database())) as server:
        assert stream_run(server.url, json_body={"prompt": "task", "input_data": "before"})[1][-1].event == "final"
        came_back: list[int] = []

        def read() -> None:
            with contextlib.suppress(httpx2.HTTPError):
                came_back.append(httpx2.get(f"{server.url}/api/runs", timeout=120).status_code)

        readers = [threading.Thread(target=read, daemon=True) for _ in range(40)]
        with _frozen(own_pg_server):
            for reader in readers:
                reader.start()
            time.sleep(0.5)  # for the reads to reach the server (were one late, the run would only be less held)
            run = _Run(server.url)
            run.join(45)  # (the reads hold the old code's threads for 60 s)
            ended_while_frozen, back_before_the_run_ended = not run.is_alive(), list(came_back)
        run.join(60)
        for reader in readers:
            reader.join(120)
    assert ended_while_frozen and run.events[-1].event == "final"
    assert back_before_the_run_ended == []
    assert came_back == [200] * 40


def test_runs_that_keep_their_input_wait_for_a_frozen_postgresql_without_holding_the_others(
    own_pg_server: PgServer, fake: FakeOpenAI
) -> None:
    """While PostgreSQL is frozen, four runs that keep their input wait for it (a kept input needs the run's row
    written first, which waits for the database up to 30 s); on a server whose default threads are four, a
    fifth run that keeps nothing still starts and ends `final` meanwhile. Old behaviour caught: the input was
    kept from the thread that makes the run's workspace, a default thread, so the four held all of them and the
    fifth run waited for the database too."""
    keep = {"prompt": "task", "input_data": "kept", "settings": {"keep_input": True}}
    with LiveServer(make_settings(fake, rlm_database_url=own_pg_server.create_database())) as server:
        assert stream_run(server.url, json_body={"prompt": "task", "input_data": "before"})[1][-1].event == "final"
        loop: asyncio.AbstractEventLoop = server.app.state.loop
        loop.call_soon_threadsafe(loop.set_default_executor, ThreadPoolExecutor(4))
        keepers = [threading.Thread(target=stream_run, args=(server.url,), kwargs={"json_body": keep}) for _ in "abcd"]
        with _frozen(own_pg_server):
            for keeper in keepers:
                keeper.start()
            assert wait_until(lambda: len(server.app.state.engine.runs.live()) == 4, timeout=30)
            time.sleep(0.5)  # for them to reach their inputs (were one late, the fifth would only be less held)
            run = _Run(server.url)
            run.join(20)  # (the old code held it for the 30 s the kept inputs wait)
            ended_while_frozen = not run.is_alive()
        run.join(60)
        for keeper in keepers:
            keeper.join(120)
    assert ended_while_frozen and run.events[-1].event == "final"


def test_the_first_write_after_a_restart_of_postgresql_succeeds(own_pg_server: PgServer) -> None:
    """The history writer's connection dies with the server as well; the first write after it is back (deleting
    a run, which is answered at once, not retried later) is made on a new one. Old behaviour caught (the attack
    pass): that delete failed with `StoreUnavailable` ("terminating connection due to administrator command"),
    answered 503 over HTTP, on a server idle since the restart."""
    store = PostgresRunStore(own_pg_server.create_database())
    run_id = "0123456789abcdef"
    try:
        store.begin(run_record(run_id, time.time()))
        store.abandon(run_id, "unfinished")
        assert store.flush() and store.status(run_id) == "unfinished"
        own_pg_server.stop()
        own_pg_server.start()
        assert store.delete(run_id) and store.status(run_id) is None
    finally:
        store.close()


def test_an_ended_run_not_yet_written_to_the_history_is_still_served(pg_url: str, fake: FakeOpenAI) -> None:
    """A run that ended while its process's history writer was held up (here by a lock on the runs table; after a
    restart of PostgreSQL, by the writes queued meanwhile) is still followed from that process's memory: the
    history is asked whether another process deleted it only once what the writer holds is written. Old
    behaviour caught (the review): its row not written yet read as deleted, and the stream answered 404."""
    with LiveServer(make_settings(fake, rlm_database_url=pg_url)) as one, psycopg.connect(pg_url) as blocker:
        blocker.execute("LOCK TABLE runs IN EXCLUSIVE MODE")  # reads go on, the writer waits
        _, events = stream_run(one.url, json_body={"prompt": "task", "input_data": "data"})
        assert events[-1].event == "final"
        threading.Timer(3.0, blocker.rollback).start()  # longer than a follower looks for a run not yet written
        assert _shape(_stored_stream(one.url, events[0].data["run_id"])) == _shape(events)
        assert wait_until(lambda: [run["status"] for run in _runs(one.url)] == ["finished"], 10)
