"""Sessions: follow-up questions on the same REPL, over real HTTP against the fake model server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from rlm_service import sessions
from rlm_service.capacity import LocalCapacity
from rlm_service.sessions import Session, SessionManager
from tests.conftest import (
    LiveServer,
    SseEvent,
    make_settings,
    parse_sse,
    post_process,
    removal_held_until_health_answers,
    script,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI

INPUT = "header line\n" + "".join(f"record {i}: value={i * 7}\n" for i in range(2000)) + "TAIL-SECRET-7f3a\n"
FINISH = "answer.update(content=str({expr}), ready=True)"


def ask(
    url: str, prompt: str, *, input_data: str | None = None, session_id: str | None = None, **settings: Any
) -> list[SseEvent]:
    body: dict[str, Any] = {"prompt": prompt}
    if input_data is not None:
        body["input_data"] = input_data
    if session_id is not None:
        body["session_id"] = session_id
    if settings:
        body["settings"] = settings
    response, events = stream_run(url, json_body=body)
    assert response.status_code == 200, response.text
    return events


def root_messages(fake: FakeOpenAI) -> list[str]:
    """The text of every message the root model was sent, request by request."""
    return ["\n".join(str(m.get("content") or "") for m in body["messages"]) for body in fake.stats.root_bodies]


def first_user_message(body: dict[str, Any]) -> str:
    return next(str(m["content"]) for m in body["messages"] if m["role"] == "user")


@pytest.mark.parametrize("repl", ["subprocess", "inprocess"])
def test_a_three_question_session_reuses_the_variables_of_the_first(fake: FakeOpenAI, repl: str) -> None:
    """Mutant caught: closing the run's REPL at its end whatever `settings.session` says (the second
    question's cell then fails with NameError)."""
    fake.record = True
    first = script(
        {
            "code": [
                "records = [l for l in context.splitlines() if l.startswith('record')]\n"
                "total = sum(int(l.split('=')[1]) for l in records)"
            ]
        },
        {"code": [FINISH.format(expr="total")]},
    )
    second = script({"code": [FINISH.format(expr="len(records)")]})
    third = script({"code": ["answer.update(content=f'{total // len(records)} avg; ' + context[-17:-1], ready=True)"]})
    with LiveServer(make_settings(fake, rlm_repl=repl)) as server:
        one = ask(server.url, first, input_data=INPUT, session=True)
        session_id = one[0].data["session_id"]
        assert session_id and one[-1].data["answer"] == str(sum(i * 7 for i in range(2000)))
        two = ask(server.url, second, session_id=session_id)
        three = ask(server.url, third, session_id=session_id)
        described = httpx2.get(f"{server.url}/api/sessions/{session_id}").json()
    assert two[0].event == "start" and two[0].data["session_id"] == session_id
    assert two[-1].data["answer"] == "2000" and two[-1].data["ready"]
    assert three[-1].data["answer"] == "6996 avg; TAIL-SECRET-7f3a"
    assert described["runs"] == [one[0].data["run_id"], two[0].data["run_id"], three[0].data["run_id"]]
    assert described["live_run"] is None and described["expires_at"] > time.time() + 1000
    follow_up = first_user_message(fake.stats.root_bodies[-1])
    assert "Q: " + second in follow_up and "A: 2000" in follow_up  # earlier questions and answers
    assert "- records: list, 2,000 items = ['record 0: value=0'" in follow_up  # the variables
    assert "- total: int" in follow_up
    assert all("TAIL-SECRET-7f3a" not in text for text in root_messages(fake))  # never the input itself


def test_follow_ups_are_refused_clearly(fake: FakeOpenAI) -> None:
    slow = script({"code": ["import time\ntime.sleep(1.5)"]}, {"code": [FINISH.format(expr="1")]})
    with LiveServer(make_settings(fake)) as server:
        unknown = post_process(server.url, json={"prompt": "x", "session_id": "s0000000000000000"})
        one = ask(server.url, script({"code": [FINISH.format(expr="1")]}), input_data="abc", session=True)
        session_id = one[0].data["session_id"]
        with_input = post_process(server.url, json={"prompt": "x", "session_id": session_id, "input_data": "new"})
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": slow, "session_id": session_id}) as live,
        ):
            lines = live.iter_lines()
            next(lines)
            busy = post_process(server.url, json={"prompt": "x", "session_id": session_id})
            busy_delete = httpx2.delete(f"{server.url}/api/sessions/{session_id}")
            list(lines)
        deleted = httpx2.delete(f"{server.url}/api/sessions/{session_id}")
        after = post_process(server.url, json={"prompt": "x", "session_id": session_id})
        gone = httpx2.get(f"{server.url}/api/sessions/{session_id}")
    assert unknown.status_code == 404 and "no session" in unknown.json()["detail"]
    assert with_input.status_code == 422 and "session's input" in with_input.json()["detail"]
    assert busy.status_code == 409 and "still going" in busy.json()["detail"]
    assert busy_delete.status_code == 409
    assert deleted.status_code == 204 and after.status_code == 404 and gone.status_code == 404


def test_deleting_a_session_frees_its_worker_and_its_workspace(fake: FakeOpenAI) -> None:
    where = script({"code": ["import os\nprint(os.getpid(), os.getcwd())"]}, {"code": [FINISH.format(expr="1")]})
    with LiveServer(make_settings(fake)) as server:
        events = ask(server.url, where, input_data="abc", session=True)
        pid, workdir = next(e for e in events if e.event == "output").data["stdout"].split()
        assert Path(workdir).is_dir() and os.path.exists(f"/proc/{pid}")
        assert httpx2.delete(f"{server.url}/api/sessions/{events[0].data['session_id']}").status_code == 204
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(int(pid)), timeout=5)
    assert not Path(workdir).exists()


def test_the_server_answers_while_an_ended_session_s_files_are_deleted(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending a session deletes its directory in a thread (it may hold 100,000 files): the server answers
    meanwhile. Mutant: the deletion on the event loop → `/health` gets no answer while it lasts."""
    with LiveServer(make_settings(fake)) as server:
        events = ask(server.url, script({"code": [FINISH.format(expr="1")]}), input_data="abc", session=True)
        with removal_held_until_health_answers(monkeypatch, server.url):
            assert httpx2.delete(f"{server.url}/api/sessions/{events[0].data['session_id']}").status_code == 204


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_idle_sessions_expire_and_the_longest_idle_is_evicted(fake: FakeOpenAI) -> None:
    done = script({"code": [FINISH.format(expr="1")]})
    with LiveServer(make_settings(fake, rlm_session_idle_s=1.0)) as expiring:
        session_id = ask(expiring.url, done, input_data="a", session=True)[0].data["session_id"]
        assert httpx2.get(f"{expiring.url}/api/sessions/{session_id}").status_code == 200
        assert wait_until(
            lambda: httpx2.get(f"{expiring.url}/api/sessions/{session_id}").status_code == 404, timeout=10
        )
    with LiveServer(make_settings(fake, rlm_max_sessions=2)) as bounded:
        ids = [ask(bounded.url, done, input_data="a", session=True)[0].data["session_id"] for _ in range(3)]
        kept = [httpx2.get(f"{bounded.url}/api/sessions/{i}").status_code for i in ids]
    assert kept == [404, 200, 200]


def test_a_session_whose_worker_died_says_so_and_goes_on_from_its_input(fake: FakeOpenAI) -> None:
    fake.record = True
    pid_cell = script({"code": ["import os\nkept = 1\nprint(os.getpid())"]}, {"code": [FINISH.format(expr="1")]})
    again = script({"code": ["answer.update(content=str((len(context), 'kept' in dir())), ready=True)"]})
    with LiveServer(make_settings(fake)) as server:
        first = ask(server.url, pid_cell, input_data="abcdef", session=True)
        pid = int(next(e for e in first if e.event == "output").data["stdout"])
        os.kill(pid, signal.SIGKILL)
        after = ask(server.url, again, session_id=first[0].data["session_id"])
    assert after[-1].data["answer"] == "(6, False)"
    assert "The REPL was restarted since the last question" in first_user_message(fake.stats.root_bodies[-1])


def test_a_session_survives_a_failed_question(fake: FakeOpenAI) -> None:
    with LiveServer(make_settings(fake)) as server:
        first = ask(
            server.url,
            script({"code": ["kept = 41"]}, {"code": [FINISH.format(expr="kept")]}),
            input_data="x",
            session=True,
        )
        fake.inject("status", role="root", status=500, count=10)
        failed = ask(server.url, "anything", session_id=first[0].data["session_id"])
        fake.faults.clear()
        third = ask(
            server.url, script({"code": [FINISH.format(expr="kept + 1")]}), session_id=first[0].data["session_id"]
        )
    assert failed[-1].event == "error" and failed[-1].data["code"] == "model_unavailable"
    assert third[-1].data["answer"] == "42"


def test_the_history_groups_a_sessions_runs(fake: FakeOpenAI, tmp_path: Path) -> None:
    done = script({"code": [FINISH.format(expr="1")]})
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        first = ask(server.url, done, input_data="a", session=True)
        ask(server.url, done, session_id=first[0].data["session_id"])
        ask(server.url, done, input_data="b")
        runs = httpx2.get(f"{server.url}/api/runs").json()["runs"]
        one = httpx2.get(f"{server.url}/api/runs/{runs[1]['id']}").json()["run"]
    assert [run["session_id"] for run in runs] == [None, first[0].data["session_id"], first[0].data["session_id"]]
    assert one["session_id"] == first[0].data["session_id"]


@contextmanager
def streamed_session_run(url: str, prompt: str, input_data: str) -> Iterator[Iterator[SseEvent]]:
    """A run that keeps its session, its events read as they come while the block runs."""
    body = {"prompt": prompt, "input_data": input_data, "settings": {"session": True}}
    with httpx2.Client(timeout=30) as client, client.stream("POST", f"{url}/process", json=body) as response:
        yield parse_sse(response.iter_lines())


def test_cancelling_a_question_mid_cell_stops_the_cell_and_the_session_goes_on(fake: FakeOpenAI) -> None:
    """The page starts every run in a session, and its Stop must still stop a cell that hangs. Mutant caught:
    WorkerRepl.execute letting the cancellation through without killing the worker (the cell sleeps on in the
    session's worker, and the next question waits for it)."""
    fake.record = True
    hang = script({"code": ["import os\nprint(os.getpid(), flush=True)"]}, {"code": ["import time\ntime.sleep(60)"]})
    with LiveServer(make_settings(fake)) as server:
        with streamed_session_run(server.url, hang, "abcdef") as events:
            start = next(events)
            output = next(e for e in events if e.event == "output")
            next(e for e in events if e.event == "code")  # the second cell, which hangs
            pid = int(output.data["stdout"].split()[0])
            assert httpx2.post(f"{server.url}/api/runs/{start.data['run_id']}/cancel").status_code == 202
            rest = list(events)
        assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled"
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=5)
        after = ask(
            server.url, script({"code": [FINISH.format(expr="len(context)")]}), session_id=start.data["session_id"]
        )
    assert after[-1].data["answer"] == "6"
    assert "cancelled while a cell ran" in first_user_message(fake.stats.root_bodies[-1])


def test_cancelling_a_question_while_the_repl_lists_its_variables_leaves_the_next_question_working(
    fake: FakeOpenAI,
) -> None:
    """A follow-up starts by listing the session's variables (their reprs, which code defines); cancelled then,
    the next question must still be answered, and told that the variables are gone. Mutant caught:
    WorkerRepl.begin_run letting the cancellation through with the worker alive (the listing's late reply was
    read as the next question's, whose own was then read as a cell's outcome: a protocol error)."""
    fake.record = True
    slow = "class Slow:\n    def __repr__(self):\n        __import__('time').sleep(5)\n        return 's'\ns = Slow()"
    with LiveServer(make_settings(fake)) as server:
        first = ask(server.url, script({"code": [slow, FINISH.format(expr="1")]}), input_data="abcdef", session=True)
        session_id = first[0].data["session_id"]
        with (
            httpx2.Client(timeout=30) as client,
            client.stream(
                "POST", f"{server.url}/process", json={"prompt": "never asked", "session_id": session_id}
            ) as response,
        ):
            events = parse_sse(response.iter_lines())
            start = next(events)
            assert httpx2.post(f"{server.url}/api/runs/{start.data['run_id']}/cancel").status_code == 202
            rest = list(events)
        after = ask(server.url, script({"code": [FINISH.format(expr="len(context)")]}), session_id=session_id)
    assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled"
    assert after[-1].event == "final" and after[-1].data["answer"] == "6", after[-1].data
    assert "cancelled while the REPL listed its variables" in first_user_message(fake.stats.root_bodies[-1])


def test_a_session_is_kept_even_when_no_cell_ran(fake: FakeOpenAI) -> None:
    """The root model may end (in prose, or on an error) before the REPL finished starting; the session
    named in `start` must still exist. Mutant caught: keeping the REPL only if its start was already done."""
    prose = script({"text": "Just prose.", "code": []}, {"text": "Still prose.", "code": []})
    with LiveServer(make_settings(fake)) as server:
        events = ask(server.url, prose, input_data="abc", session=True)
        described = httpx2.get(f"{server.url}/api/sessions/{events[0].data['session_id']}")
        again = ask(
            server.url, script({"code": [FINISH.format(expr="len(context)")]}), session_id=events[0].data["session_id"]
        )
    assert events[-1].event == "final" and events[-1].data["note"]
    assert described.status_code == 200
    assert again[-1].data["answer"] == "3"


class _SlowRepl:
    async def close(self) -> None:
        await asyncio.sleep(0.5)


class _Workspace:
    removed = False

    def remove(self) -> None:
        self.removed = True


async def test_ending_a_session_cancelled_midway_still_removes_its_workspace() -> None:
    """A session's end cancelled while its worker stops (the sweeper cancelled at a stop, say): the end goes on
    and the manager's close waits for it. Old behaviour caught (the review): the workspace, with the session's
    input, was left on disk, and its worker uid never given back."""
    manager = SessionManager(idle_s=600, capacity=LocalCapacity(2))
    workspace = _Workspace()
    manager.reserve()
    manager.add(Session("s1", _SlowRepl(), workspace, 0, 0, "text", ""))  # type: ignore[arg-type]
    ending = asyncio.ensure_future(manager.end("s1"))
    await asyncio.sleep(0.1)
    ending.cancel()
    await asyncio.gather(ending, return_exceptions=True)
    await manager.close()
    assert workspace.removed and manager.get("s1") is None


def test_a_session_whose_first_run_is_live_is_busy_not_unknown(fake: FakeOpenAI) -> None:
    """`start` names the session at once: asked about while its first run is live, it is that run's (a follow-up
    or a delete is refused with 409, as for a follow-up's live run), never a session that does not exist. Old
    behaviour caught (the attack pass): 404 "it never existed, was deleted, or ended" to all three, until the
    first run had ended."""
    hang = script({"code": ["import time\ntime.sleep(60)"]}, {"code": [FINISH.format(expr="1")]})
    with LiveServer(make_settings(fake)) as server:
        with streamed_session_run(server.url, hang, "abc") as events:
            start = next(events)
            run_id, session_id = start.data["run_id"], start.data["session_id"]
            next(e for e in events if e.event == "code")  # the cell that hangs
            follow_up = post_process(server.url, json={"prompt": "x", "session_id": session_id})
            described = httpx2.get(f"{server.url}/api/sessions/{session_id}")
            deleted = httpx2.delete(f"{server.url}/api/sessions/{session_id}")
            assert httpx2.post(f"{server.url}/api/runs/{run_id}/cancel").status_code == 202
            list(events)
        after = httpx2.get(f"{server.url}/api/sessions/{session_id}")
    assert follow_up.status_code == 409 and run_id in follow_up.json()["detail"], follow_up.text
    assert described.status_code == 200, described.text
    assert described.json()["live_run"] == run_id and described.json()["input"] == {"chars": 3, "lines": 1}
    assert deleted.status_code == 409 and run_id in deleted.json()["detail"], deleted.text
    assert after.status_code == 200 and after.json()["runs"] == [run_id] and after.json()["live_run"] is None


def test_a_long_session_keeps_and_shows_only_its_latest_questions(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session followed up again and again: each follow-up's root model is told the latest TURNS_SHOWN questions
    (and how many came before), with ANSWER_CHARS_SHOWN characters of each answer, and the session keeps no more
    text than that. Old behaviour caught: every earlier question and whole answer was kept for the session's life
    (100 kB answers: 20 MB after 200 follow-ups, for a session that never went idle) and told to the root model
    (434,000 characters of first message by then, past the context window of most models)."""
    monkeypatch.setattr(sessions, "TURNS_SHOWN", 3)
    fake.record = True
    long_answer = script({"code": ["answer.update(content='q' + 'a' * 9_999, ready=True)"]})
    with LiveServer(make_settings(fake)) as server:
        session_id = ask(server.url, long_answer, input_data="x", session=True)[0].data["session_id"]
        for _ in range(5):
            assert ask(server.url, long_answer, session_id=session_id)[-1].event == "final"
        told = first_user_message(fake.stats.root_bodies[-1])
        session = server.app.state.engine.sessions.get(session_id)
        assert session is not None and len(session.describe(1)["runs"]) == 6
        held = sum(len(turn.prompt) + len(turn.answer) for turn in session.turns)
    assert "(2 earlier questions not shown)" in told
    assert told.count("Q: scripted task") == 3 and "\n3. Q: " in told and "\n2. Q: " not in told
    assert f"a … [{10_000 - sessions.ANSWER_CHARS_SHOWN:,} more characters]" in told
    assert len(told) < 3 * (sessions.ANSWER_CHARS_SHOWN + len(long_answer)) + 2000, len(told)
    assert held <= 3 * (sessions.ANSWER_CHARS_SHOWN + len(long_answer)), held
