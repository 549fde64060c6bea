"""Shared fixtures: the fake OpenAI server, settings pointing at it, the app under uvicorn, SSE reading."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import uvicorn

from rlm_service.api import create_app
from rlm_service.config import Settings
from tests.fake_openai import FakeOpenAI

ROOT_MODEL = "root-model"
SUB_MODEL = "sub-model"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(root_model=ROOT_MODEL).start()
    yield server
    server.stop()


def make_settings(fake: FakeOpenAI | None = None, **overrides: Any) -> Settings:
    """Settings for tests: never read from the environment's .env, pointed at the fake server."""
    values: dict[str, Any] = {
        "openai_api_base": fake.url if fake else "http://127.0.0.1:9/v1",
        "openai_model_name": ROOT_MODEL, "openai_sub_model_name": SUB_MODEL,
        "openai_api_key": "sk-test-key", "rlm_model_retries": 2, "rlm_exec_timeout_s": 30,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The real app under uvicorn in a thread, on a free port."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.port = free_port()
        self.app = create_app(settings, **app_kwargs)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live(fake: FakeOpenAI) -> Iterator[LiveServer]:
    with LiveServer(make_settings(fake)) as server:
        yield server


@dataclass
class SseEvent:
    event: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Blank-line framed SSE: `event:` names, `data:` lines joined; comments skipped."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield SseEvent(name, json.loads("\n".join(data)))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])


def stream_run(base_url: str, *, json_body: dict[str, Any] | None = None, files: Any = None,
               data: Any = None, headers: dict[str, str] | None = None,
               timeout: float = 60) -> tuple[httpx2.Response, list[SseEvent]]:
    """POST /process and read the whole event stream."""
    with httpx2.Client(timeout=timeout) as client, client.stream(
        "POST", f"{base_url}/process", json=json_body, files=files, data=data, headers=headers
    ) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(parse_sse(response.iter_lines()))


def names(events: list[SseEvent]) -> list[str]:
    return [event.event for event in events]


def script(*turns: dict[str, Any]) -> str:
    """A prompt that makes the fake root model play these turns ({"text", "code": [...]})."""
    return f"scripted task <<<SCRIPT {json.dumps(list(turns))} SCRIPT>>>"


def worker_processes() -> list[int]:
    """Pids of live REPL workers started from this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"rlm_service.repl.worker" in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
