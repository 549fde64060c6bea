"""Security headers on every response of the real server (issue #14, item 13)."""

from __future__ import annotations

import httpx2

from rlm_service.pageheaders import CONTENT_SECURITY_POLICY, page_headers
from tests.conftest import LiveServer, script

COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


def expect_headers(response: httpx2.Response, *, policy: bool = True) -> None:
    for name, value in COMMON.items():
        assert response.headers.get(name) == value, (response.url, name)
    assert response.headers.get("content-security-policy") == (CONTENT_SECURITY_POLICY if policy else None)


def test_every_response_carries_the_security_headers(live: LiveServer) -> None:
    """Pages, scripts, the API, refusals, unknown paths and the event stream alike. Mutant: api.py without
    `app.add_middleware(PageHeadersMiddleware)`."""
    with httpx2.Client(base_url=live.url, timeout=30) as client:
        for path in (
            "/",
            "/index.html",
            "/main.js",
            "/styles.css",
            "/vendor/marked.esm.js",
            "/events.schema.json",
            "/api/config",
            "/health",
            "/no-such-page",
        ):
            expect_headers(client.get(path))
        expect_headers(client.post("/process", json={"prompt": ""}))
        body = {"prompt": script({"code": ["answer.update(content='ok', ready=True)"]}), "input_data": "x"}
        with client.stream("POST", "/process", json=body) as stream:
            assert stream.status_code == 200
            expect_headers(stream)
            stream.read()
        expect_headers(client.get("/docs"), policy=False)  # Swagger UI needs its CDN and an inline script


def test_the_policy_keeps_the_page_to_its_own_server() -> None:
    policy = dict(part.split(" ", 1) for part in page_headers("/")["Content-Security-Policy"].split("; "))
    assert policy["default-src"] == policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self' data: blob:"
    assert policy["frame-ancestors"] == policy["base-uri"] == "'none'"
    assert "Content-Security-Policy" not in page_headers("/docs")
