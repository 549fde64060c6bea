"""The page and runs that outlive their connection (issue #17): re-attaching after a refresh or a dropped
connection, Stop through the cancel route, follow-up questions on a session, and conversations in the
history. Debian's Chromium under Playwright, against the served app and the fake OpenAI server."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx2
import pytest

from rlm_service import runs as runs_module
from tests.browser import (  # noqa: F401  (fixtures, used by name)
    DroppingProxy,
    browser_fixture,
    expect_clean_console,
    open_page,
    page_fixture,
    start_run,
    status_is,
)
from tests.conftest import LiveServer, make_settings, parse_sse, process_alive, script, stream_run, wait_until
from tests.fake_openai import FakeOpenAI, default_sub_reply

pytestmark = pytest.mark.browser

HELD = "hold this call"
"""The sub-call prompt the gate holds until the test releases it."""

HELD_RUN = script(
    {"text": "First a look at the input.", "code": ["print('looked at', len(context), 'characters')"]},
    {"text": "Now the slow part.", "code": [f"r = llm_query({HELD!r})\nprint('held:', r)"]},
    {"code": ["answer.update(content='**done** ' + r, ready=True)"]},
)


class Gate:
    """The fake sub-model's replies, holding the one to `HELD` until `release()`: a run that waits in the middle
    of a cell for as long as the test needs, on however busy a machine."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, prompt: str) -> str:
        if prompt != HELD:
            return default_sub_reply(prompt)
        self.entered.set()
        self.released.wait(60)
        return "released"

    def release(self) -> None:
        self.released.set()


@pytest.fixture(name="gate")
def gate_fixture(fake: FakeOpenAI) -> Iterator[Gate]:
    gate = Gate()
    fake.sub = gate
    yield gate
    gate.release()


def shown_runs(page: Any) -> list[str]:
    """The runs the page's address names (`#run=…`)."""
    found = re.search(r"#(?:.*&)?run=([^&]*)", unquote(page.url))
    return found.group(1).split(",") if found else []


def run_facts(page: Any) -> dict[str, Any]:
    """What the log shows of each iteration: how many cards, thoughts, cells and outputs."""
    return page.evaluate("""() => {
        const count = (s) => document.querySelectorAll(s).length;
        return { cards: [1, 2, 3].map((n) => count(`#log .card[data-iteration='${n}']`)),
                 thoughts: count('#log .thought'), cells: count('#log .cell'), outputs: count('#log .cell-meta'),
                 stdout: [...document.querySelectorAll('#log pre.stdout')].map((e) => e.textContent) };
    }""")


WHOLE_RUN = {
    "cards": [1, 1, 1],
    "thoughts": 2,
    "cells": 3,
    "outputs": 3,
    "stdout": ["looked at 9 characters\n", "held: released\n"],
}


@pytest.mark.parametrize("history", ["off", "on"])
def test_a_refresh_mid_run_reattaches_and_shows_the_whole_run_once(
    page: Any, fake: FakeOpenAI, gate: Gate, tmp_path: Path, history: str
) -> None:
    """With history off the page replays the run from its events route; with history on, from the stored run and
    then the events route after the last stored event. Mutants: buildRequest without `detach` (the refresh
    cancels the run); `started` not putting the run in the address (the refreshed page shows nothing);
    showRuns following from event 0 after replaying the stored events (every event of the run twice)."""
    database = str(tmp_path / "h.sqlite3") if history == "on" else "off"
    with LiveServer(make_settings(fake, rlm_history_db=database)) as server:
        open_page(page, server)
        start_run(page, HELD_RUN, "the input")
        assert gate.entered.wait(30)
        page.wait_for_selector(".card[data-iteration='2'] pre.code")
        [run_id] = shown_runs(page)
        page.reload()
        page.wait_for_selector(".card[data-iteration='2'] pre.code")
        assert page.is_enabled("#stop-button") and page.is_disabled("#run-button")  # the run is followed live
        gate.release()
        page.wait_for_selector("#answer-badge.ready")
        assert run_facts(page) == WHOLE_RUN
        assert page.inner_text("#answer") == "done released"
        assert re.fullmatch(r"Done in [\d.]+ s after 3 iterations\.", page.inner_text("#status"))
        assert shown_runs(page) == [run_id]
        if history == "on":
            assert page.input_value("#prompt") == HELD_RUN  # the stored run tells its prompt
        live_log = page.inner_text("#log")
        page.reload()  # once it has ended, a refresh shows it again from its start
        page.wait_for_selector("#answer-badge.ready")
        assert page.inner_text("#log") == live_log
    expect_clean_console(page)


def test_a_dropped_connection_reattaches_by_itself_with_last_event_id(page: Any, fake: FakeOpenAI, gate: Gate) -> None:
    """A proxy drops every connection while a cell runs; the page re-attaches with `Last-Event-ID` and shows the
    rest of the run exactly once, as a fresh replay of the whole run shows it. Mutants: followRun giving up on a
    network error (the run never finishes on the page); attach sending `Last-Event-ID` one lower (the last event
    drawn comes again) or none (the whole run twice)."""
    with LiveServer(make_settings(fake)) as server:
        proxy = DroppingProxy(server.port)
        try:
            page.goto(proxy.url + "/")
            page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
            start_run(page, HELD_RUN, "the input")
            assert gate.entered.wait(30)
            # the held call's progress is the last event before the gate: once the page has drawn it, it has
            # drawn every event the run has emitted, and nothing more comes until the gate opens
            page.wait_for_selector(".card[data-iteration='2'] .progress[data-done='0']")
            [run_id] = shown_runs(page)
            run = server.app.state.engine.runs.get(run_id)
            drawn = len(run.events)
            assert run.events[-1].type == "subcalls"
            proxy.drop()
            pattern = re.compile(
                rf"GET /api/runs/{run_id}/events HTTP/1.1\r\n(?:.+\r\n)*?last-event-id: (\d+)\r\n", re.IGNORECASE
            )
            assert wait_until(lambda: pattern.search(proxy.sent()), timeout=30)
            assert int(pattern.search(proxy.sent()).group(1)) == drawn
            gate.release()
            page.wait_for_selector("#answer-badge.ready")
            assert run_facts(page) == WHOLE_RUN
            live_log = page.inner_text("#log")
            page.reload()  # a fresh page replays the run from its first event
            page.wait_for_selector("#answer-badge.ready")
            assert page.inner_text("#log") == live_log
        finally:
            proxy.close()
    expect_clean_console(page, "net::ERR")


def test_stop_cancels_through_the_server_and_says_so_plainly(page: Any, fake: FakeOpenAI, gate: Gate) -> None:
    """Stop asks the server to cancel the run (the page's own connection would not: runs are detached); the
    stream's `error` `cancelled` reads as a stop, not a fault, whoever cancelled. Mutant: stopRun aborting the
    page's fetch instead of POSTing /cancel (the detached run goes on)."""
    with LiveServer(make_settings(fake)) as server:
        open_page(page, server)
        start_run(page, HELD_RUN, "the input")
        assert gate.entered.wait(30)
        page.wait_for_selector(".card[data-iteration='2'] pre.code")
        [run_id] = shown_runs(page)
        page.click("#stop-button")
        status_is(page, "Stopped: the run was cancelled.")
        terminal = server.app.state.engine.runs.get(run_id).events[-1]
        assert terminal.type == "error" and terminal.code == "cancelled" and "through the API" in terminal.message
        assert page.is_hidden("#banner") and page.inner_text("#answer-badge") == "Stopped"
        assert page.inner_text("#answer") == "The run was stopped before it wrote an answer."
        assert page.is_enabled("#run-button") and page.is_disabled("#stop-button")
        gate.release()
        # cancelled by another client: the page says what the server said, still as a stop
        gate.entered.clear()
        gate.released.clear()
        start_run(page, HELD_RUN, "the input")
        assert gate.entered.wait(30)
        page.wait_for_function(f"() => !location.hash.includes({json.dumps(run_id)}) && location.hash.length > 5")
        [other] = shown_runs(page)
        assert httpx2.post(f"{server.url}/api/runs/{other}/cancel").status_code == 202
        status_is(page, "Stopped: The run was cancelled: cancelled through the API.")
        assert page.is_hidden("#banner")
        gate.release()
    expect_clean_console(page)


def test_stop_ends_a_cell_that_hangs_and_frees_the_run(page: Any, live: LiveServer) -> None:
    """The page's runs keep their REPL for follow-ups, and Stop must still end a cell that would run for a minute.
    Mutant: WorkerRepl.execute not killing the worker when the run is cancelled mid-cell."""
    open_page(page, live)
    start_run(page, script({"code": ["import os\nprint(os.getpid())"]}, {"code": ["import time\ntime.sleep(60)"]}))
    page.wait_for_selector(".card[data-iteration='2'] pre.code")
    pid = int(page.inner_text(".card[data-iteration='1'] pre.stdout"))
    page.click("#stop-button")
    status_is(page, "Stopped: the run was cancelled.")
    assert wait_until(lambda: not process_alive(pid), timeout=5)
    assert wait_until(lambda: live.app.state.slots.active == 0)
    assert page.locator("#run-button").is_enabled()
    expect_clean_console(page)


COUNT_WORDS = script({"code": ["words = context.split()\nanswer.update(content=f'{len(words)} words', ready=True)"]})
LONGEST = script({"code": ["answer.update(content=f'longest: {max(words, key=len)}', ready=True)"]})


def test_a_follow_up_continues_the_conversation_and_the_history_keeps_it_together(
    page: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The follow-up sends its prompt and session only, reads the variables of the first question, and shows as
    the next turn; a refresh shows the whole conversation, and the history lists it as one entry that replays
    both turns in order. Mutants: buildRequest without `session` (no follow-up box); renderHistory listing every
    run on its own (three entries); askFollowUp sending the input again (the server refuses it, 422)."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        start_run(page, COUNT_WORDS, "a bb ccc dddd")
        page.wait_for_selector("#answer-badge.ready")
        assert page.inner_text("#answer") == "4 words"
        page.wait_for_selector("#follow-up:not([hidden]) #follow-up-button:enabled")
        assert "same REPL" in page.inner_text("#follow-up-note")
        stream_run(
            server.url,
            json_body={
                "prompt": script({"code": ["answer.update(content='x', ready=True)"]}),
                "input_data": "another task",
            },
        )  # someone else's run between the two questions
        page.fill("#follow-up-prompt", LONGEST)
        with page.expect_request(lambda r: r.url.endswith("/process")) as request:
            page.click("#follow-up-button")
        sent = json.loads(request.value.post_data)
        assert set(sent) == {"prompt", "session_id", "settings"} and sent["prompt"] == LONGEST
        page.wait_for_function("() => document.getElementById('answer').textContent.trim() === 'longest: dddd'")
        page.wait_for_selector("#answer-badge.ready")
        first, second = shown_runs(page)
        conversation = page.evaluate("""() => ({
            earlier: [...document.querySelectorAll('#conversation > li')].map((li) =>
                [li.querySelector('.question').textContent, li.querySelector('.turn-answer').textContent.trim()]),
            question: document.getElementById('answer-question').textContent,
            heads: [...document.querySelectorAll('#log .turn-head')].map((h) => h.innerText),
            follow: document.getElementById('follow-up-prompt').value,
        })""")
        assert conversation["earlier"] == [[COUNT_WORDS, "4 words"]]
        assert conversation["question"] == LONGEST and conversation["follow"] == ""
        assert [head.split(" · ")[0] for head in conversation["heads"]] == ["Question 1", "Question 2"]
        page.wait_for_selector("#follow-up:not([hidden]) #follow-up-button:enabled")  # the panel is complete
        shown = page.inner_text("#answer-panel")

        page.reload()
        page.wait_for_function("() => document.getElementById('answer').textContent.trim() === 'longest: dddd'")
        page.wait_for_selector("#follow-up:not([hidden]) #follow-up-button:enabled")
        assert page.inner_text("#answer-panel") == shown
        assert page.input_value("#prompt") == COUNT_WORDS

        entries = page.locator("#history li button")
        entries.first.wait_for()
        assert entries.count() == 2
        assert entries.first.get_attribute("data-run-ids") == f"{first},{second}"
        assert "2 questions" in entries.first.inner_text() and entries.first.inner_text().startswith("scripted task")
        page.click("[data-example=summary]")  # change the page before replaying
        entries.nth(1).click()
        status_is(page, "Replayed run", starts=True)
        assert page.is_hidden("#conversation")
        entries.first.click()
        status_is(page, "Replayed a conversation of 2 questions.")
        page.wait_for_selector("#follow-up:not([hidden]) #follow-up-button:enabled")
        assert page.inner_text("#answer-panel") == shown
        assert shown_runs(page) == [first, second]
        page.evaluate(f"() => {{ location.hash = '#run={first}'; }}")  # a link to another run, opened in this tab
        status_is(page, f"Replayed run {first}.")
        assert page.inner_text("#answer") == "4 words" and page.is_hidden("#conversation")
    expect_clean_console(page)


def test_a_follow_up_that_cannot_run_says_why_and_what_to_do(page: Any, fake: FakeOpenAI, gate: Gate) -> None:
    """409 while another question of the session runs elsewhere; 404 once the session has ended. Mutant:
    askFollowUp passing 404 and 409 to the generic refusal (the server's words only, no way forward)."""
    with LiveServer(make_settings(fake)) as server:
        open_page(page, server)
        start_run(page, COUNT_WORDS, "a bb ccc dddd")
        page.wait_for_selector("#follow-up:not([hidden]) #follow-up-button:enabled")
        session_id = server.app.state.engine.runs.get(shown_runs(page)[0]).session_id

        def elsewhere() -> None:
            with (
                httpx2.Client(timeout=60) as client,
                client.stream(
                    "POST", f"{server.url}/process", json={"prompt": HELD_RUN, "session_id": session_id}
                ) as response,
            ):
                list(parse_sse(response.iter_lines()))

        other = threading.Thread(target=elsewhere)
        other.start()
        try:
            assert gate.entered.wait(30)
            page.fill("#follow-up-prompt", LONGEST)
            page.click("#follow-up-button")
            status_is(
                page,
                "Another question of this conversation is still running (in another tab or client). "
                "Wait for it to end, or stop it there, then ask again.",
            )
            assert page.inner_text("#answer") == "4 words"  # the conversation shown is unchanged
        finally:
            gate.release()
            other.join(60)
        assert httpx2.delete(f"{server.url}/api/sessions/{session_id}").status_code == 204
        page.click("#follow-up-button")
        status_is(
            page,
            "Follow-up questions are not possible here: the server no longer keeps this conversation's REPL",
            starts=True,
        )
        assert "run the task again with its input (Run, above)" in page.inner_text("#status")
        page.wait_for_selector("#follow-up-button:disabled")
        assert "no longer keeps" in page.inner_text("#follow-up-note")
        assert page.input_value("#follow-up-prompt") == LONGEST  # the question stays, to ask after starting over
    expect_clean_console(page, "409", "404")


def test_a_run_that_ended_long_ago_without_history_is_explained(page: Any, live: LiveServer) -> None:
    """The address names a run the server no longer has (history off, and the run has left its memory).
    Mutant: explain() without the 404 case (a bare "refused to show the run (404)")."""
    _, events = stream_run(live.url, json_body={"prompt": script({"code": ["answer.update(content='x', ready=True)"]})})
    run_id = events[0].data["run_id"]
    live.app.state.engine.runs.forget(run_id)
    open_page(page, live, f"#run={run_id}")
    page.wait_for_selector("#banner.error:not([hidden])")
    banner = page.inner_text("#banner")
    assert banner.startswith(f"Run {run_id} is no longer on this server.") and "RLM_HISTORY_DB=off" in banner
    assert "Run the task again" in banner
    assert shown_runs(page) == []  # a refresh does not ask again
    assert page.is_enabled("#run-button")
    expect_clean_console(page, "404")


PLOT_CELL = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"


def test_a_figure_the_server_no_longer_keeps_is_a_note_not_a_broken_image(
    page: Any, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run keeps its newest figures whole (LIVE_FIGURE_CHARS, here lowered so that only the newest is) and
    older ones without their image: re-attached to, the run shows a note in their place. Old page caught: an
    <img> with an empty data: address (a broken image) and no word of what happened."""
    monkeypatch.setattr(runs_module, "LIVE_FIGURE_CHARS", 1)
    ready = "answer.update(content='two', ready=True)"
    prompt = script({"code": [PLOT_CELL]}, {"code": [PLOT_CELL]}, {"code": [ready]})
    with LiveServer(make_settings(fake)) as server:
        _, events = stream_run(server.url, json_body={"prompt": prompt, "input_data": "the input"})
        assert [event.data["iteration"] for event in events if event.event == "figure"] == [1, 2]
        run_id = events[0].data["run_id"]
        kept = [event for event in server.app.state.engine.runs.get(run_id).events if event.type == "figure"]
        assert [bool(figure.data) for figure in kept] == [False, True]  # what the page is about to be sent
        open_page(page, server, f"#run={run_id}")  # re-attached: the run is replayed from its events route
        page.wait_for_selector("#answer-badge.ready")
        first, second = (page.locator(f".card[data-iteration='{n}']") for n in (1, 2))
        assert first.locator("img").count() == 0
        assert first.locator("p.muted").inner_text() == "A figure the server no longer keeps (the run made many)."
        assert second.locator("img.figure").count() == 1
        assert page.evaluate("document.querySelector(\".card[data-iteration='2'] img.figure\").naturalWidth") > 100
    expect_clean_console(page)
