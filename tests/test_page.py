"""The web page in a real browser: Debian's Chromium driven by Playwright, against the served app."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, make_settings, script, wait_until, worker_processes
from tests.fake_openai import FakeOpenAI, HTTPFault

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.console_problems = problems  # type: ignore[attr-defined]
    yield tab
    context.close()


def expect_clean_console(page: Any, *allowed: str) -> None:
    problems = [p for p in page.console_problems if not any(a in p for a in allowed)]
    assert problems == []


def open_page(page: Any, server: LiveServer) -> None:
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-chip').textContent.includes('root-model')")


def test_a_run_unfolds_live(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.fill("#prompt", "Summarize the input")
    page.fill("#input-text", "first line\nsecond line\nthird line\n" * 50)
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#answer-badge.ready", timeout=20000)
    cards = page.locator(".card")
    assert cards.count() == 3
    assert page.locator(".card pre.code").count() == 3
    assert "print" in page.locator(".card pre.code").first.inner_text()
    assert page.locator(".card pre.code .hljs-built_in, .card pre.code .hljs-keyword").count() > 0
    assert "characters" in page.locator(".card pre.stdout").first.inner_text()
    bar = page.locator(".progress")
    assert bar.get_attribute("data-done") == bar.get_attribute("data-total") == "4"
    assert page.locator("#answer h2").inner_text() == "Summary"
    assert page.locator("#answer li").count() == 4
    assert page.locator("#answer-badge").inner_text() == "Ready"
    assert page.locator("#usage-root").inner_text().startswith("3 requests")
    assert page.locator("#usage-sub").inner_text().startswith("4 requests")
    assert "Done in" in page.locator("#status").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-after-run.png"), full_page=True)
    expect_clean_console(page)


def test_uploaded_file_reaches_the_run(page: Any, live: LiveServer, tmp_path: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("x" * 123_456)
    open_page(page, live)
    page.fill("#prompt", script({"code": ["answer.update(content=f'**{len(context)}** chars', ready=True)"]}))
    page.click("#tab-file")
    page.set_input_files("#file-input", str(data))
    assert page.locator("#file-name").inner_text() == "notes.txt"
    assert page.locator("#file-size").inner_text() == "(120.6 KB)"
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready")
    assert page.locator("#answer strong").inner_text() == "123456"
    expect_clean_console(page)


def test_stop_cancels_the_run(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.fill("#prompt", script({"code": ["import time\ntime.sleep(60)"]}))
    page.click("#run-button")
    page.wait_for_selector(".card pre.code")
    assert wait_until(lambda: worker_processes() != [])
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Stopped')")
    assert wait_until(lambda: worker_processes() == [], timeout=2)
    assert wait_until(lambda: live.app.state.slots.active == 0)
    assert page.locator("#run-button").is_enabled()
    expect_clean_console(page)


def test_error_event_is_shown(page: Any, fake: FakeOpenAI) -> None:
    def refuse(messages: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
        raise HTTPFault(401, "bad key")

    fake.root = refuse
    with LiveServer(make_settings(fake)) as server:
        open_page(page, server)
        page.fill("#prompt", "anything")
        page.click("#run-button")
        page.wait_for_selector("#banner.error:not([hidden])")
        assert "OPENAI_API_KEY" in page.locator("#banner").inner_text()
        assert page.locator("#status").inner_text() == "Failed (auth)."
    expect_clean_console(page)


def test_refusal_is_shown(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.fill("#prompt", "anything")
    page.locator("details.settings summary").click()
    page.fill("#max-iterations", "999")
    page.click("#run-button")
    page.wait_for_selector("#banner.error:not([hidden])")
    text = page.locator("#banner").inner_text()
    assert "(422)" in text and "RLM_MAX_ITERATIONS" in text
    expect_clean_console(page, "422")


def test_setup_banner_without_a_key(page: Any, fake: FakeOpenAI) -> None:
    settings = make_settings(fake, openai_api_base="https://api.openai.com/v1", openai_api_key=None)
    with LiveServer(settings) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#banner:not([hidden])")
        text = page.locator("#banner").inner_text()
        assert "Setup needed" in text and "OPENAI_API_KEY" in text
    expect_clean_console(page)


def test_markdown_answer_is_sanitized(page: Any, live: LiveServer) -> None:
    hostile = "# Title\n\n<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>[x](javascript:alert(1))"
    open_page(page, live)
    page.fill("#prompt", script({"code": [f"answer.update(content={hostile!r}, ready=True)"]}))
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready")
    assert page.locator("#answer h1").inner_text() == "Title"
    assert page.evaluate("window.pwned") is None
    assert page.locator("#answer script").count() == 0
    assert "javascript:" not in (page.locator("#answer a").get_attribute("href") or "")


SAMPLE = (": keep-alive\r\n\r\n"
          "event: start\r\ndata: {\"run_id\": \"r1\", \"note\": \"héllo → wörld\"}\r\n\r\n"
          "event: output\ndata: {\"stdout\":\n"
          "data: \"two\\nlines ✓\"}\n\n"
          "event: unknown\ndata: {\"x\": 1}\n\n"
          "event: final\rdata: {\"answer\": \"done 🎉\", \"ready\": true}\r\r")
EXPECTED = [
    {"event": "start", "data": {"run_id": "r1", "note": "héllo → wörld"}},
    {"event": "output", "data": {"stdout": "two\nlines ✓"}},
    {"event": "unknown", "data": {"x": 1}},
    {"event": "final", "data": {"answer": "done 🎉", "ready": True}},
]


def test_stream_reader_survives_every_split(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    result = page.evaluate(
        """async ([sample]) => {
            const { readSse } = await import('/app.js');
            const bytes = new TextEncoder().encode(sample);
            const read = async (chunks) => {
                const stream = new ReadableStream({ start(c) { chunks.forEach((x) => c.enqueue(x)); c.close(); } });
                const events = [];
                await readSse(new Response(stream), (e) => events.push(e));
                return JSON.stringify(events);
            };
            const outcomes = new Set();
            for (let i = 0; i <= bytes.length; i++) {
                outcomes.add(await read([bytes.slice(0, i), bytes.slice(i)]));
            }
            for (let i = 0; i < bytes.length; i++) {
                for (let j = i; j <= bytes.length; j += 7) {
                    outcomes.add(await read([bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)]));
                }
            }
            outcomes.add(await read(Array.from(bytes, (b) => new Uint8Array([b]))));
            return { outcomes: [...outcomes], positions: bytes.length };
        }""",
        [SAMPLE],
    )
    assert result["positions"] > 150
    assert [json.loads(outcome) for outcome in result["outcomes"]] == [EXPECTED]


def test_page_works_at_phone_width_and_from_the_keyboard(browser: Any, live: LiveServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, reduced_motion="reduce")
    page = context.new_page()
    try:
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('model-chip').textContent.includes('root-model')")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        reached = []
        for _ in range(12):  # every control is reachable with the keyboard, in reading order
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id || document.activeElement.dataset.example"))
        assert reached.index("summary") < reached.index("prompt") < reached.index("tab-paste")
        page.fill("#prompt", script({"code": ["answer.update(content='phone', ready=True)"]}))
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#answer-badge.ready")
        animation = page.evaluate("getComputedStyle(document.querySelector('.backdrop')).animationName")
        assert animation == "none"
    finally:
        context.close()


def _luminance(rgb: tuple[float, float, float]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_text_contrast_meets_wcag_aa(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    colors = page.evaluate("""() => {
        const pick = (sel) => getComputedStyle(document.querySelector(sel)).color;
        return { text: pick('h1'), muted: pick('.tagline'), status: pick('#status'), chip: pick('.chip') };
    }""")
    darkest_panel = (22 * 0.62 + 7 * 0.38, 30 * 0.62 + 11 * 0.38, 54 * 0.62 + 22 * 0.38)
    brightest_panel = (22 * 0.62 + 80 * 0.38, 30 * 0.62 + 70 * 0.38, 54 * 0.62 + 120 * 0.38)
    for name, css in colors.items():
        rgb = tuple(float(v) for v in css[css.index("(") + 1:css.index(")")].split(",")[:3])
        for background in (darkest_panel, brightest_panel):
            light, dark = sorted((_luminance(rgb), _luminance(background)), reverse=True)
            assert (light + 0.05) / (dark + 0.05) >= 4.5, name


def test_a_plot_is_shown_in_the_log(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.click("[data-example=plot]")
    assert "Plot the distribution" in page.input_value("#prompt")
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready", timeout=30000)
    figure = page.locator(".card img.figure")
    assert figure.count() == 1
    assert page.evaluate("document.querySelector('.card img.figure').naturalWidth") > 100
    assert "values" in page.locator("#answer").inner_text()
    expect_clean_console(page)


def test_history_replays_a_run_as_it_was_shown_live(page: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        page.fill("#prompt", "Summarize the input")
        page.fill("#input-text", "one\ntwo\nthree\n")
        page.click("#run-button")
        page.wait_for_selector("#answer-badge.ready")
        live_log = page.inner_text("#log")
        live_answer = page.inner_html("#answer")
        live_usage = page.inner_text("#usage-root")
        page.wait_for_selector("#history li button")
        page.click("[data-example=summary]")  # change the page before replaying
        page.locator("#history li button").first.click()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Replayed run')")
        assert page.inner_text("#log") == live_log
        assert page.inner_html("#answer") == live_answer
        assert page.inner_text("#usage-root") == live_usage
        assert page.input_value("#prompt") == "Summarize the input"
        with page.expect_download() as download:
            page.click("#export-md")
        assert download.value.suggested_filename.endswith(".md")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-run")
        page.wait_for_function("document.getElementById('status').textContent === 'Run deleted.'")
        page.wait_for_function("document.querySelectorAll('#history li').length === 0")
    expect_clean_console(page)


def test_child_runs_fold_under_the_cell_that_started_them(page: Any, fake: FakeOpenAI) -> None:
    child = ("Look closer. <<<SCRIPT " + json.dumps([
        {"text": "Inside the child.", "code": ["n = len(context)\nprint('child sees', n)"]},
        {"code": ["answer.update(content=f'**{n}** characters', ready=True)"]}]) + " SCRIPT>>>")
    prompt = script({"code": [f"r = rlm_query({child!r}, context='0123456789')\nprint(r)"]},
                    {"code": ["answer.update(content='child says ' + r, ready=True)"]})
    with LiveServer(make_settings(fake, rlm_max_depth=2)) as server:
        open_page(page, server)
        page.fill("#prompt", prompt)
        page.click("#run-button")
        page.wait_for_selector("#answer-badge.ready")
        fold = page.locator(".card[data-iteration='1'] details.child")
        assert fold.count() == 1
        assert "depth 1" in fold.locator("summary").inner_text() and "answered" in fold.locator("summary").inner_text()
        fold.locator("summary").click()
        assert "child sees 10" in fold.locator("pre.stdout").first.inner_text()
        assert fold.locator(".child-answer strong").inner_text() == "10"
        assert "child says" in page.inner_text("#answer")
    expect_clean_console(page)
