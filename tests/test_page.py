"""The web page in a real browser: Debian's Chromium driven by Playwright, against the served app."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rlm_service.demos import DEMOS
from rlm_service.events import EVENT_TYPES
from tests.browser import browser_fixture, expect_clean_console, open_page, page_fixture, start_run, status_is  # noqa: F401  (fixtures, used by name)
from tests.conftest import REPO, LiveServer, make_settings, run_record, script
from tests.fake_openai import FakeOpenAI, HTTPFault

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
NO_SESSION = "404"
"""A run that ends before its REPL has started keeps no session: the page's GET /api/sessions/{id} answers 404
(which Chromium logs), and the page offers no follow-up."""


def test_a_run_unfolds_live(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    start_run(page, "Summarize the input", "first line\nsecond line\nthird line\n" * 50)
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
    root_usage = page.locator("#usage-root").inner_text()
    assert re.fullmatch(r"3 requests\ntokens in [\d,]+ · out [\d,]+", root_usage), root_usage
    assert page.locator("#usage-sub").inner_text().startswith("4 requests\ntokens in ")
    assert re.fullmatch(r"Done in [\d.]+ s after 3 iterations\.", page.locator("#status").inner_text())
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


def test_an_empty_input_warns_before_the_run_starts(
    page: Any, fake: FakeOpenAI, live: LiveServer, tmp_path: Path
) -> None:
    """Mutant: startRun without emptyInputWarning starts the run on the first press."""
    open_page(page, live)
    page.fill("#prompt", script({"code": ["answer.update(content=f'{len(context)} chars', ready=True)"]}))
    page.click("#run-button")
    status_is(page, "The input is empty: the model would have nothing to read")
    page.click("#run-button")  # the user saw the warning and runs anyway
    page.wait_for_selector("#answer-badge.ready")
    assert page.inner_text("#answer") == "0 chars"
    requests = fake.stats.root_requests
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    page.set_input_files("#file-input", str(empty))
    page.click("#run-button")
    status_is(page, "The file empty.txt is empty (0 bytes)")
    assert page.inner_text("#answer") == "0 chars" and fake.stats.root_requests == requests
    expect_clean_console(page)


def test_error_event_is_shown(page: Any, fake: FakeOpenAI) -> None:
    def refuse(messages: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
        raise HTTPFault(401, "bad key")

    fake.root = refuse
    with LiveServer(make_settings(fake)) as server:
        open_page(page, server)
        start_run(page, "anything")
        page.wait_for_selector("#banner.error:not([hidden])")
        banner = page.locator("#banner").inner_text()
        assert banner.count("OPENAI_API_KEY") == 1
        assert page.locator("#status").inner_text() == f"Failed: {banner}"
        assert page.inner_text("#answer") == f"The run failed: {banner}"
    expect_clean_console(page, NO_SESSION)


def test_an_unreachable_model_server_is_said_once(page: Any) -> None:
    """Mutant: errorText prefixing a fixed sentence per code ("The model server failed or could not be
    reached.") to a message that already says so."""
    with LiveServer(make_settings(None, rlm_model_retries=0)) as server:
        open_page(page, server)
        start_run(page, "anything")
        page.wait_for_selector("#banner.error:not([hidden])", timeout=30000)
        banner = page.locator("#banner").inner_text()
        assert len(re.findall(r"reach", banner)) == 1, banner
        assert "OPENAI_API_BASE" in banner
    expect_clean_console(page, NO_SESSION)


def test_a_refusal_says_why_next_to_the_run_button(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.locator("details.settings summary").click()
    page.fill("#max-iterations", "999")
    start_run(page, "anything")
    page.wait_for_selector("#banner.error:not([hidden])")
    assert "(422)" in page.locator("#banner").inner_text()
    status = page.locator("#status").inner_text()
    assert status.startswith("Refused (422): ") and "RLM_MAX_ITERATIONS" in status
    expect_clean_console(page, "422")


def test_token_banner_follows_the_token(page: Any, fake: FakeOpenAI) -> None:
    """Mutants: loadConfig not hiding the "auth" banner after a success; tokenProblem ignoring whether a token
    was sent (always "needs a token")."""
    with LiveServer(make_settings(fake, rlm_api_token="s3cret")) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#banner.error:not([hidden])")
        assert "needs a token" in page.inner_text("#banner")
        page.fill("#api-token", "guess")
        page.press("#api-token", "Tab")
        page.wait_for_function("() => document.getElementById('banner').textContent.startsWith('Wrong token')")
        start_run(page, "anything")
        status_is(page, "Refused (401): Wrong token", starts=True)
        page.fill("#api-token", "s3cret")
        page.press("#api-token", "Tab")
        page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
        page.wait_for_selector("#banner", state="hidden")
        page.click("#run-button")
        page.wait_for_selector("#answer-badge.ready")
    expect_clean_console(page, "401")


def test_setup_banner_without_a_key(page: Any, fake: FakeOpenAI) -> None:
    settings = make_settings(fake, openai_api_base="https://api.openai.com/v1", openai_api_key=None)
    with LiveServer(settings) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#banner:not([hidden])")
        text = page.locator("#banner").inner_text()
        assert "Setup needed" in text and "OPENAI_API_KEY" in text
    expect_clean_console(page)


SAMPLE = (
    ": keep-alive\r\n\r\n"
    'id: 1\r\nevent: start\r\ndata: {"run_id": "r1", "note": "héllo → wörld"}\r\n\r\n'
    'event: output\ndata: {"stdout":\n'
    'data: "two\\nlines ✓"}\n\n'
    'id: 3\nevent: unknown\ndata: {"x": 1}\n\n'
    "data: plain text\n\n"
    'event: final\rdata: {"answer": "done 🎉", "ready": true}\r\r'
    'event: cut\ndata: {"never": "ended"}\n'
)
EXPECTED = [
    {"event": "start", "data": {"run_id": "r1", "note": "héllo → wörld"}, "id": "1"},
    {"event": "output", "data": {"stdout": "two\nlines ✓"}, "id": "1"},
    {"event": "unknown", "data": {"x": 1}, "id": "3"},
    {"event": "message", "data": "plain text", "id": "3"},
    {"event": "final", "data": {"answer": "done 🎉", "ready": True}, "id": "3"},
]


def test_stream_reader_survives_every_split(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    result = page.evaluate(
        """async ([sample]) => {
            const { readSse } = await import('/sse.js');
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
    assert result["positions"] > 200
    assert [json.loads(outcome) for outcome in result["outcomes"]] == [EXPECTED]


def test_a_large_event_in_small_pieces_is_read_in_time_linear_in_its_size(page: Any, live: LiveServer) -> None:
    """An 8 Mi-character answer (a final event's whole answer) arriving in 1 KiB pieces: the reader appended
    each piece to what it held and scanned it all again, quadratic in the event's size (in 16 KiB pieces it
    took 1.5 s to 4 s here with the page not responding; in 1 KiB pieces, sixteen times that). Read once per
    piece, it takes a fraction of a second, and the bound is far from both. Mutant: the reader that scans
    everything it holds at each piece."""
    open_page(page, live)
    took = page.evaluate(
        """async () => {
            const { readSse } = await import('/sse.js');
            const text = 'id: 1\\nevent: final\\ndata: {"answer": "' + 'a'.repeat(8 * 2 ** 20) + '"}\\n\\n';
            const bytes = new TextEncoder().encode(text);
            const stream = new ReadableStream({ start(c) {
                for (let i = 0; i < bytes.length; i += 1024) c.enqueue(bytes.slice(i, i + 1024));
                c.close();
            } });
            const events = [];
            const started = performance.now();
            await readSse(new Response(stream), (e) => events.push(e));
            if (events.length !== 1 || events[0].data.answer.length !== 8 * 2 ** 20) throw new Error("misread");
            return performance.now() - started;
        }"""
    )
    print(f"8 Mi characters in 1 KiB pieces read in {took:.0f} ms")
    assert took < 15_000, took


def test_page_works_at_phone_width_and_from_the_keyboard(browser: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """Mutants: wireLayout not moving the answer panel (it stays after the log); the answer's action buttons
    not wrapping (the page scrolls sideways)."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, reduced_motion="reduce")
    page = context.new_page()
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        try:
            page.goto(server.url + "/")
            page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            reached = []
            for _ in range(12):  # every control is reachable with the keyboard, in reading order
                page.keyboard.press("Tab")
                reached.append(page.evaluate("document.activeElement.id || document.activeElement.dataset.example"))
            assert reached.index("log") < reached.index("prompt") < reached.index("tab-paste")
            page.fill("#input-text", "data")
            page.fill("#prompt", script({"code": ["answer.update(content='phone', ready=True)"]}))
            page.focus("#prompt")
            page.keyboard.press("Control+Enter")
            page.wait_for_selector("#answer-badge.ready")
            page.wait_for_selector("#delete-run:not([hidden])")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            tops = page.evaluate("""() => Object.fromEntries(['.input-panel', '#answer-panel', '.history-panel',
                '#log-panel'].map((s) => [s, document.querySelector(s).getBoundingClientRect().top]))""")
            assert tops[".input-panel"] < tops["#answer-panel"] < tops[".history-panel"] < tops["#log-panel"]
            follows = page.evaluate("document.querySelector('.input-panel').nextElementSibling.id")
            assert follows == "answer-panel"  # reading order too, not only on screen
            animation = page.evaluate("getComputedStyle(document.querySelector('.backdrop')).animationName")
            assert animation == "none"
            page.set_viewport_size({"width": 1360, "height": 900})
            page.wait_for_function(
                "() => document.getElementById('log-panel').nextElementSibling?.id === 'answer-panel'"
            )
        finally:
            context.close()


def _luminance(rgb: tuple[float, ...]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _over(top: tuple[float, ...], below: tuple[float, ...]) -> tuple[float, ...]:
    """`top` (r, g, b, alpha) composited over the opaque colour `below`."""
    alpha = top[3]
    return tuple(top[i] * alpha + below[i] * (1 - alpha) for i in range(3))


def _contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


# Text on the page in each of its looks, with what lies between it and the glass panel under it.
CONTRAST_PROBES = """() => {
    const probe = document.createElement('span');
    document.body.append(probe);
    const rgba = (css) => {
        probe.style.color = '';
        probe.style.color = css;
        const parts = getComputedStyle(probe).color.match(/[\\d.]+/g).map(Number);
        return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
    };
    const root = getComputedStyle(document.documentElement);
    const variable = (name) => rgba(root.getPropertyValue(name).trim());
    // samples of everything the page can show, drawn by the page's own classes
    const sample = document.createElement('div');
    sample.innerHTML = `
        <ol class="history"><li><button><span class="what">a run</span><span class="when">today
          <span class="status-tag finished">finished</span><span class="status-tag not-ready">not ready</span>
          <span class="status-tag failed">failed</span><span class="status-tag running">running</span>
          <span class="questions"> · 2 questions</span>
        </span></button></li></ol>
        <ol class="conversation"><li><p class="question">an earlier question</p></li></ol>
        <section class="turn"><h3 class="turn-head">Question 2 · why</h3></section>
        <span class="badge ready">Ready</span><span class="badge draft">Draft</span><span class="badge none">No</span>
        <p class="note">note</p><p class="status running">s</p><p class="status done">s</p>
        <p class="status failed">s</p><p class="status warn">s</p><button class="link">example</button>
        <article class="card"><div class="card-head"><strong>Iteration 1</strong><span>1 s</span></div>
          <p class="thought">t</p><div class="cell"><pre class="code"><code>
          <span class="hljs-keyword">k</span><span class="hljs-string">s</span><span class="hljs-number">1</span>
          <span class="hljs-comment">c</span><span class="hljs-title">t</span><span class="hljs-meta">m</span>
          <span class="hljs-params">p</span></code></pre><pre class="stdout">out</pre><pre class="error">err</pre>
          <div class="cell-meta"><span class="tag">cut</span></div>
          <div class="progress-label">sub-calls</div></div></article>`;
    document.querySelector('.history-panel').append(sample);
    const selectors = ['h1', '#task-title', '.tagline', 'label', 'legend', '#status', '.chip', '.settings summary',
        '.tabs button[aria-selected="false"]', '.tabs button[aria-selected="true"]', 'button.secondary',
        '#answer .muted'];
    const elements = [...selectors.map((s) => document.querySelector(s)), ...sample.querySelectorAll(
        '.what, .when, .status-tag, .questions, .question, .turn-head, .badge, .note, .status, .link, .card-head *, ' +
        '.thought, pre code span, ' +
        '.stdout, .error, .tag, .progress-label')];
    const glass = document.querySelector('.input-panel');
    const out = elements.map((element) => {
        const layers = [];
        for (let node = element; node && node !== glass && !node.classList.contains('glass');
             node = node.parentElement) {
            layers.unshift(rgba(getComputedStyle(node).backgroundColor));
        }
        return { name: element.className || element.tagName, color: rgba(getComputedStyle(element).color), layers };
    });
    const primary = getComputedStyle(document.querySelector('button.primary')).color;
    return {
        glass: [rgba(getComputedStyle(glass).backgroundColor), variable('--glass-strong')],
        backdrops: ['--bg-0', '--bg-1', '--glow-1', '--glow-2'].map(variable),
        drifts: ['--drift-1', '--drift-2'].map(variable),
        texts: out,
        primary: { color: rgba(primary), layers: [['--accent'], ['--accent-2']].map(([v]) => variable(v)) },
    };
}"""


def test_text_contrast_meets_wcag_aa(page: Any, live: LiveServer) -> None:
    """Colours come from the page's CSS: its variables for the backdrop, each element's computed colours.
    Mutant: `--muted: #6a7388` in styles.css fails it."""
    open_page(page, live)
    found = page.evaluate(CONTRAST_PROBES)
    backdrops = [tuple(b[:3]) for b in found["backdrops"]]
    backdrops += [_over(drift, b) for drift in found["drifts"] for b in backdrops]
    panels = [_over(glass, b) for glass in found["glass"] for b in backdrops]
    assert len(found["texts"]) > 40
    failures = []
    for text in found["texts"] + [{"name": "button.primary", **found["primary"]}]:
        for panel in panels:
            under = panel
            if text["name"] == "button.primary":
                candidates = [tuple(layer[:3]) for layer in text["layers"]]
            else:
                for layer in text["layers"]:
                    under = _over(layer, under)
                candidates = [under]
            for background in candidates:
                ratio = _contrast(_over(text["color"], background), background)
                if ratio < 4.5:
                    failures.append((text["name"], round(ratio, 2)))
    assert failures == []


def test_the_three_demos_run_in_one_click_each(page: Any, live: LiveServer) -> None:
    """Each demo fills the command line's task (rlm_service.demos) and makes its own sample data of the same
    kind; each runs to a ready answer."""
    open_page(page, live)
    page.click("[data-example=log]")
    assert page.input_value("#prompt") == DEMOS["log"].prompt
    assert page.inner_text("#file-name") == "app.log" and page.is_visible("#pane-file")
    size = page.inner_text("#file-size")
    assert re.fullmatch(r"\(1\.\d MB\)", size), size
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready")
    assert page.get_attribute(".progress", "data-total") == "4"  # the fake root model splits into 4
    assert "20,00" in page.inner_text("#run-meta")  # 20,000 lines and the two deploy lines

    page.click("[data-example=numbers]")
    assert page.input_value("#prompt") == DEMOS["numbers"].prompt
    assert page.is_hidden("#file-info") and page.is_visible("#pane-paste")
    notes = page.input_value("#input-text")
    times = re.findall(r"(\d+\.\d) ms", notes)
    assert len(times) == 600 and len(re.findall(r"\d+", notes)) > 3 * len(times)
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready", timeout=30000)
    assert page.evaluate("document.querySelector('.card img.figure').naturalWidth") > 100
    assert "standard deviation" in page.inner_text("#answer")

    page.click("[data-example=records]")
    assert page.input_value("#prompt") == DEMOS["records"].prompt
    records = page.input_value("#input-text")
    assert records.count("=== BOOK #") == records.count("=== END ===") == 400
    assert re.search(r"^(TITLE|title|Title):: ", records, re.MULTILINE) and "    Donated by " in records
    page.click("#run-button")
    page.wait_for_selector("#answer-badge.ready")
    expect_clean_console(page)


def test_sample_transcript_has_real_timestamps(page: Any, live: LiveServer) -> None:
    open_page(page, live)
    page.click("[data-example=summary]")
    stamps = re.findall(r"^\[(?:(\d+):)?(\d\d):(\d\d)\]", page.input_value("#input-text"), re.MULTILINE)
    assert len(stamps) == 60
    seconds = []
    for hours, minutes, secs in stamps:
        assert int(minutes) < 60 and int(secs) < 60
        seconds.append(int(hours or 0) * 3600 + int(minutes) * 60 + int(secs))
    assert seconds == sorted(seconds) and len(set(seconds)) == 60


def test_a_run_without_an_answer_says_what_happened(page: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """Mutants: renderNoAnswer not called for an empty final answer (the placeholder stays); the history tag
    of a not-ready run with class `finished`; `plural` always adding "s"."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        page.locator("details.settings summary").click()
        page.fill("#max-iterations", "1")
        start_run(page, script({"code": ["print('looking')"]}))
        status_is(page, "Stopped after 1 iteration without an answer.")
        assert page.inner_text("#answer-badge") == "No answer"
        assert "stopped after 1 iteration (the limit) before the model wrote an answer" in page.inner_text("#answer")
        assert page.inner_text("#usage-root").startswith("1 request\n")
        tag = page.locator("#history .status-tag").first
        tag.wait_for()
        assert tag.inner_text() == "not ready"
        colours = page.evaluate("""() => {
            const tag = document.querySelector('#history .status-tag');
            const other = document.createElement('span');
            other.className = 'status-tag finished';
            tag.after(other);
            return [getComputedStyle(tag).color, getComputedStyle(other).color,
                    getComputedStyle(tag).backgroundColor, getComputedStyle(other).backgroundColor];
        }""")
        assert colours[0] != colours[1] and colours[2] != colours[3]
    expect_clean_console(page)


def test_a_final_note_is_shown_in_place_of_the_answer(page: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """A root model that writes no code: the run's note takes the answer's place, live and replayed.
    Mutant: HANDLERS.final ignoring `note` (the page's own no-answer text shows instead)."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        start_run(page, script({"text": "I would rather talk about it.", "code": []}))
        page.wait_for_selector("#answer-badge.none")
        note = page.inner_text("#answer")
        assert note.startswith("The root model wrote no code in 2 replies") and "RLM_ROOT_PROTOCOL=text" in note
        assert page.inner_text("#status") == (
            "Stopped after 2 iterations without an answer: see the note in the Answer panel."
        )
        assert "I would rather talk about it." in page.inner_text("#log")  # the model's text stays its thought
        page.locator("#history li button").first.click()
        status_is(page, "Replayed run", starts=True)
        assert page.inner_text("#answer") == note
    expect_clean_console(page, NO_SESSION)


def test_every_event_type_has_a_handler_live_replay_and_children(page: Any, live: LiveServer) -> None:
    """Live runs and replays both go through handleEvent, so the handler maps are the page's whole coverage.
    Mutant: deleting `figure` from HANDLERS (or `answer` from CHILD_HANDLERS) fails it."""
    schema = json.loads((REPO / "frontend" / "events.schema.json").read_text())

    def types(doc: dict[str, Any]) -> set[str]:
        names = set()
        for entry in doc["oneOf"]:
            definition = doc["$defs"][entry["$ref"].rsplit("/", 1)[1]]
            names.add(definition["properties"]["type"]["const"])
        return names

    shipped = types(schema)
    assert shipped == set(EVENT_TYPES), "regenerate: python -m rlm_service.events > frontend/events.schema.json"
    open_page(page, live)
    handled = page.evaluate("""async () => {
        const { HANDLERS, CHILD_HANDLERS } = await import('/render.js');
        return { run: Object.keys(HANDLERS), child: Object.keys(CHILD_HANDLERS) };
    }""")
    assert set(handled["run"]) == shipped
    # a child's own events arrive as `child` events of the root's stream, never nested in one another
    assert set(handled["child"]) == shipped - {"child"}


def test_older_runs_lists_every_run_created_at_the_same_time(page: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """25 runs created at the same time (written through the store: the API cannot time them) and the page's
    history shows 20: "Older runs" lists the other 5, each once, and is then hidden. Mutant: the page asking
    for the next page with `before` alone (the 5 are skipped, being created at the same time as the 20th)."""
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        store = server.app.state.store
        for index in range(25):
            question = f"question {index:02d}"
            store.begin(run_record(f"tie{index:02d}", 1_700_000_000.0, prompt=question, status="finished"))
        assert store.flush()
        open_page(page, server)
        page.wait_for_function("() => document.querySelectorAll('#history li').length === 20")
        page.click("#history-more")
        page.wait_for_function("() => document.querySelectorAll('#history li').length >= 25")
        page.wait_for_selector("#history-more", state="hidden")
        shown = page.locator("#history .what").all_inner_texts()
    assert shown == [f"question {index:02d}" for index in reversed(range(25))]
    expect_clean_console(page)


def test_history_replays_a_run_as_it_was_shown_live(page: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """Mutants: showRunActions not called when a live run ends (no Export after a live run); the history
    list reading `prompt` (which the list does not carry) instead of `prompt_preview`."""
    prompt = "Summarize the input " + "and say it well " * 30
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        page.locator("details.settings summary").click()
        page.check("#keep-input")
        start_run(page, prompt, "one\ntwo\nthree\n")
        page.wait_for_selector("#answer-badge.ready")
        live_log = page.inner_text("#log")
        live_answer = page.inner_html("#answer")
        live_usage = page.inner_text("#usage-root")
        page.wait_for_selector("#export-md:not([hidden])")  # the run just finished, not only reopened ones
        with page.expect_download() as download:
            page.click("#download-input")
        assert Path(download.value.path()).read_text() == "one\ntwo\nthree\n"
        with page.expect_download() as download:
            page.click("#export-md")
        assert download.value.suggested_filename.endswith(".md")
        page.wait_for_selector("#history li button")
        preview = page.inner_text("#history .what")
        assert preview.startswith("Summarize the input and say it well") and len(preview) < len(prompt)
        page.click("[data-example=summary]")  # change the page before replaying
        page.locator("#history li button").first.click()
        status_is(page, "Replayed run", starts=True)
        assert page.inner_text("#log") == live_log
        assert page.inner_html("#answer") == live_answer
        assert page.inner_text("#usage-root") == live_usage
        assert page.input_value("#prompt") == prompt
        assert page.is_visible("#download-input")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-run")
        status_is(page, "Run deleted.")
        page.wait_for_function("() => document.querySelectorAll('#history li').length === 0")
        assert page.is_hidden("#export-md") and page.is_hidden("#download-input")
    expect_clean_console(page)


def test_child_runs_fold_under_the_cell_that_started_them(page: Any, fake: FakeOpenAI) -> None:
    child = (
        "Look closer. <<<SCRIPT "
        + json.dumps(
            [
                {"text": "Inside the child.", "code": ["n = len(context)\nprint('child sees', n)"]},
                {"code": ["answer.update(content=f'**{n}** characters', ready=True)"]},
            ]
        )
        + " SCRIPT>>>"
    )
    prompt = script(
        {"code": [f"r = rlm_query({child!r}, context='0123456789')\nprint(r)"]},
        {"code": ["answer.update(content='child says ' + r, ready=True)"]},
    )
    with LiveServer(make_settings(fake, rlm_max_depth=2)) as server:
        open_page(page, server)
        start_run(page, prompt)
        page.wait_for_selector("#answer-badge.ready")
        fold = page.locator(".card[data-iteration='1'] details.child")
        assert fold.count() == 1
        assert "depth 1" in fold.locator("summary").inner_text() and "answered" in fold.locator("summary").inner_text()
        fold.locator("summary").click()
        assert "child sees 10" in fold.locator("pre.stdout").first.inner_text()
        assert fold.locator(".child-answer strong").inner_text() == "10"
        assert "child says" in page.inner_text("#answer")
    expect_clean_console(page)
