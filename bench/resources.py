"""Benchmarks of runs as server-side resources (issue 17): re-attaching (B9), follow-ups on a large input
against uploading it again (B10), and zero-rot across a session's questions (B6, sessions).

Each function runs the real service and returns its figures, with `failures` counting what went wrong
(an event lost or repeated, a run without a ready `final`); `bench/run.py` repeats and tabulates them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import httpx2

from bench.benchmarks import _is_chunk_size, _write_input_file, ended_ready, script, settings_for
from rlm_service.engine import Engine, RunSettings
from rlm_service.inputs import InputSpooler, RunInput

FINISH = {"code": ["answer.update(content=str(len(context)), ready=True)"]}


def _events(lines: Any) -> Any:
    from tests.conftest import parse_sse

    return parse_sse(lines)


def b9_reattach(*, work: Path, drop_after: tuple[int, ...] = (2, 5, 9)) -> dict[str, Any]:
    """B9: a detached run whose client drops after event N and reconnects 0.3 s later with `Last-Event-ID:
    N`: events lost and repeated over the whole run, and the time from the reconnect to the first event it
    missed (already emitted while it was away)."""
    from tests.conftest import spawn_server

    cells = [{"code": [f"import time\ntime.sleep(0.05)\nprint({i})"]} for i in range(10)]
    prompt = script(*cells, FINISH)
    lost = repeated = 0
    delays: list[float] = []
    with spawn_server(work) as server, httpx2.Client(timeout=60) as client:
        for point in drop_after:
            seen: list[int] = []
            with client.stream(
                "POST",
                f"{server.url}/process",
                json={"prompt": prompt, "input_data": "x", "settings": {"detach": True}},
            ) as first:
                run_id = first.headers["x-run-id"]
                for event in _events(first.iter_lines()):
                    seen.append(event.data["seq"])
                    if event.data["seq"] >= point:
                        break
            time.sleep(0.3)  # the run goes on meanwhile: the events it emits are the missed ones
            started = time.perf_counter()
            with client.stream(
                "GET", f"{server.url}/api/runs/{run_id}/events", headers={"Last-Event-ID": str(seen[-1])}
            ) as again:
                terminal = None
                for event in _events(again.iter_lines()):
                    if len(seen) == point:
                        delays.append(time.perf_counter() - started)
                    seen.append(event.data["seq"])
                    terminal = event
            lost += len(set(range(1, max(seen) + 1)) - set(seen))
            repeated += len(seen) - len(set(seen))
            if terminal is None or terminal.event != "final" or not terminal.data["ready"]:
                lost += 1
    return {
        "lost": lost,
        "repeated": repeated,
        "reconnect_ms": 1000 * sorted(delays)[len(delays) // 2],
        "failures": lost + repeated,
    }


def _multipart(path: Path, fields: dict[str, str]) -> tuple[bytes, bytes, str]:
    boundary = "rlm-bench-boundary"
    before = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    before += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="input_file"; filename="input.log"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    )
    return before.encode(), f"\r\n--{boundary}--\r\n".encode(), boundary


def _first_output_of_upload(port: int, path: Path, fields: dict[str, str]) -> tuple[float, str | None, bool]:
    """Upload `path` (sendfile) with `fields`; seconds from the first byte sent to the first `output` event,
    the session id, and whether the run ended ready."""
    before, after, boundary = _multipart(path, fields)
    length = len(before) + path.stat().st_size + len(after)
    head = (
        f"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(head + before)
        with open(path, "rb") as handle:
            sock.sendfile(handle)
        sock.sendall(after)
        first_output = None
        session_id = None
        ready = False
        with sock.makefile("r", encoding="utf-8", newline="\n") as stream:
            lines = (line.rstrip("\r\n") for line in stream)
            for line in lines:
                if not line:
                    break
            for event in _events(line for line in lines if not _is_chunk_size(line)):
                if event.event == "start":
                    session_id = event.data.get("session_id")
                if event.event == "output" and first_output is None:
                    first_output = time.perf_counter() - started
                if event.event in ("final", "error"):
                    ready = event.event == "final" and event.data["ready"]
                    break
    return first_output or float("nan"), session_id, ready


def b10_follow_up(*, size: int, work: Path) -> dict[str, Any]:
    """B10: on a `size`-byte input, the time to a follow-up's first cell output against a fresh run that
    uploads the input again (its time from the first byte sent to its first cell output)."""
    from tests.conftest import spawn_server

    source = work / "input.log"
    _write_input_file(source, size)
    look = script({"code": ["print(len(context))"]}, FINISH)
    limits = {"RLM_MAX_INPUT_BYTES": str(size + 1024), "RLM_WORKER_MEMORY_MB": str(2 * size // 2**20 + 1024)}
    failures = 0
    try:
        with spawn_server(work, **limits) as server:
            port = int(server.url.rsplit(":", 1)[1])
            fresh, session_id, ok = _first_output_of_upload(
                port, source, {"prompt": look, "settings": '{"session": true}'}
            )
            failures += not ok or session_id is None
            started = time.perf_counter()
            follow_up: float | None = None
            with (
                httpx2.Client(timeout=120) as client,
                client.stream(
                    "POST", f"{server.url}/process", json={"prompt": look, "session_id": session_id}
                ) as response,
            ):
                for event in _events(response.iter_lines()):
                    if event.event == "output" and follow_up is None:
                        follow_up = time.perf_counter() - started
                        failures += event.data["stdout"].strip() != str(size)
                    if event.event in ("final", "error"):
                        failures += not (event.event == "final" and event.data["ready"])
    finally:
        source.unlink(missing_ok=True)
    if follow_up is None:
        return {"fresh_s": fresh, "failures": failures + 1}
    return {"fresh_s": fresh, "follow_up_s": follow_up, "ratio_pct": 100 * follow_up / fresh, "failures": failures}


def _spooled(size: int) -> RunInput:
    spooler = InputSpooler(size + 1024)
    line = b"2026-11-28 INFO a log line of some length for the zero-rot benchmark\n"
    block = line * (1024 * 1024 // len(line) + 1)
    remaining = size
    while remaining > 0:
        piece = block[: min(remaining, len(block))]
        spooler.feed(piece)
        remaining -= len(piece)
    return spooler.finish()


async def _session_tokens(url: str, size: int, questions: int) -> tuple[list[int], bool]:
    """Root input tokens of the first request of each question of a session on a `size`-byte input."""
    settings = settings_for(url, rlm_worker_memory_mb=2 * size // 2**20 + 1024, rlm_max_input_bytes=size + 2048)
    tokens: list[int] = []
    ok = True
    async with Engine(settings) as engine:
        session_id = None
        for number in range(questions):
            prompt = script({"code": [f"part_{number} = context[:1000]\nprint(len(part_{number}))"]}, FINISH)
            if session_id is None:
                run = engine.run(prompt, _spooled(size), RunSettings(session=True))
            else:
                run = engine.run(prompt, session_id=session_id)
            events = [event async for event in run]
            session_id = session_id or events[0].session_id  # type: ignore[attr-defined]
            usage = [event for event in events if event.type == "usage"]
            tokens.append(usage[0].root.input_tokens)  # type: ignore[attr-defined]
            ok = ok and ended_ready(events)
    return tokens, ok


def b6_session(url: str, *, sizes: tuple[int, ...], questions: int = 5) -> dict[str, Any]:
    """B6 for sessions: root input tokens at the first and the last question of a session, by input size."""
    result: dict[str, Any] = {"failures": 0}
    lasts = []
    for size in sizes:
        tokens, ok = asyncio.run(_session_tokens(url, size, questions))
        result[f"first_{size}"], result[f"last_{size}"] = tokens[0], tokens[-1]
        lasts.append(tokens[-1])
        result["failures"] += not ok
    result["last_spread_pct"] = 100 * (max(lasts) / min(lasts) - 1)
    return result
