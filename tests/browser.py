"""What the browser tests share: Debian's Chromium under Playwright, and a server that records what reaches it.

Test modules import the fixtures (`from tests.browser import browser_fixture, page_fixture`) and use them as
`browser`, `page` and `recorder`. Under the page's
Content-Security-Policy, `wait_for_function` takes a function (`"() => …"`): a bare expression is evaluated
with `eval`, which the policy forbids.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def new_page(browser: Any, **context_options: Any) -> Any:
    """A tab in a fresh context that collects console errors in `tab.console_problems`."""
    context = browser.new_context(**{"viewport": {"width": 1360, "height": 900}, **context_options})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.console_problems = problems
    return tab


@pytest.fixture(name="page")
def page_fixture(browser: Any) -> Iterator[Any]:
    tab = new_page(browser)
    yield tab
    tab.context.close()


def expect_clean_console(page: Any, *allowed: str) -> None:
    problems = [p for p in page.console_problems if not any(a in p for a in allowed)]
    assert problems == [], problems


def open_page(page: Any, server: LiveServer, query: str = "") -> None:
    page.goto(f"{server.url}/{query}")
    page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root-model')")


def start_run(page: Any, prompt: str, input_text: str = "the input") -> None:
    page.fill("#prompt", prompt)
    page.fill("#input-text", input_text)
    page.click("#run-button")


def status_is(page: Any, text: str, *, starts: bool = False) -> None:
    """Wait until the status line near the Run button says `text` (or starts with it)."""
    check = "startsWith" if starts else "includes"
    page.wait_for_function(f"() => document.getElementById('status').textContent.{check}({json.dumps(text)})")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """Another origin: answers everything (CORS allowed, 503 JSON) and records every request it gets."""

    server: ThreadingHTTPServer
    requests: list[Recorded] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sent_authorization(self) -> bool:
        return any(
            "authorization" in r.headers
            or "authorization" in r.headers.get("access-control-request-headers", "").lower()
            for r in self.requests
        )


@pytest.fixture(name="recorder")
def recorder_fixture() -> Iterator[Recorder]:
    requests: list[Recorded] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            requests.append(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            body = b'{"detail": "a server that only records requests"}'
            self.send_response(204 if self.command == "OPTIONS" else 503)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE")
            if self.command == "OPTIONS":
                self.end_headers()
                return
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_OPTIONS = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Recorder(server, requests)
    server.shutdown()
    server.server_close()


class DroppingProxy:
    """A TCP proxy in front of a server that drops every open connection at once on `drop()`, as a proxy or a
    flaky network does mid-request. It keeps what clients sent (`sent()`), to read the requests' headers."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.connections += [client, upstream]
                record = bytearray()
                self.requests.append(record)  # type: ignore[arg-type]
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        try:
            while data := source.recv(65536):
                if record is not None:
                    record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def sent(self) -> str:
        """Everything clients sent so far, connection after connection."""
        with self.lock:
            return "\n".join(bytes(record).decode("latin-1") for record in self.requests)

    def drop(self) -> None:
        """Cut every connection open now, both ways, without a proper end of the responses in flight."""
        with self.lock:
            connections, self.connections = self.connections, []
        for end in connections:
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset on close
                end.shutdown(socket.SHUT_RDWR)  # wakes the threads reading it
            end.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()
