"""The MCP server, with the `mcp` SDK's own client: over streamable HTTP (`/mcp`) and over stdio
(`python -m rlm_service mcp`), against the fake OpenAI server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from rlm_service import mcp_http
from rlm_service.runs import LiveRun
from tests.conftest import (
    REPO,
    SUB_MODEL,
    LiveServer,
    RealServer,
    make_settings,
    peak_rss,
    private_tempdir,
    script,
    spawn_server,
    wait_until,
)
from tests.fake_openai import FakeOpenAI
from tests.test_fleet import NO_DEATH_TIMEOUT_S, replicas
from tests.test_processes import _listening
from tests.test_runs import start_detached

TOKEN = "mcp-test-token"
BATCH_THEN_WAIT = script(
    {
        "text": "Counting, asking, waiting.",
        "code": ["n = len(context)\nreplies = llm_batch(['a', 'b', 'c'])\nimport time\ntime.sleep(1.5)\nprint(n)"],
    },
    {"code": ["answer.update(content=f'{n} characters', ready=True)"]},
)
SLEEPS = script({"code": ["import time\ntime.sleep(60)"]}, {"code": ["answer.update(content='late', ready=True)"]})
LENGTH = script({"code": ["answer.update(content=str(len(context)), ready=True)"]})


class Progress:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.values: list[float] = []
        self.seen = anyio.Event()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.values.append(progress)
        self.messages.append(message or "")
        if message and message.startswith("iteration 1 "):
            self.seen.set()


def answer_text(result: CallToolResult) -> str:
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


@pytest.fixture
def http_server(fake: FakeOpenAI) -> Iterator[LiveServer]:
    with LiveServer(make_settings(fake, rlm_api_token=TOKEN, rlm_mcp_heartbeat_s=0.3)) as server:
        yield server


@asynccontextmanager
async def http_client(server: LiveServer | RealServer, mode: str = "auto", token: str = TOKEN) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=120))
    async with http, Client(streamable_http_client(f"{server.url}/mcp", http_client=http), mode=mode) as client:
        yield client


def stdio_params(fake: FakeOpenAI, tmp_path: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "rlm_service", "mcp"],
        cwd=str(tmp_path),
        env={
            "PYTHONPATH": str(REPO / "backend"),
            "OPENAI_API_BASE": fake.url,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_MODEL_NAME": "root-model",
            "OPENAI_SUB_MODEL_NAME": SUB_MODEL,
            "RLM_WORKER_PRELOAD": "numpy",
            "RLM_HISTORY_DB": str(tmp_path / "history.sqlite3"),
            "RLM_LOG_LEVEL": "warning",
            "RLM_MCP_HEARTBEAT_S": "0.3",
            **env,
        },
    )


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_over_http_rlm_run_answers_and_keeps_progress_flowing(http_server: LiveServer, mode: str) -> None:
    """Progress: the start, each iteration, each sub-call batch, and heartbeats through a silent cell.
    Mutant caught: the heartbeat task not started (the 1.5 s cell sends nothing)."""
    progress = Progress()
    async with http_client(http_server, mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools["rlm_run"].input_schema["properties"]) == {"prompt", "input_text", "session_id"}
        result = await client.call_tool(
            "rlm_run", {"prompt": BATCH_THEN_WAIT, "input_text": "hello world"}, progress_callback=progress
        )
    assert not result.is_error and answer_text(result) == "11 characters"
    assert result.structured_content is not None and result.structured_content["ready"] is True
    messages = progress.messages
    assert messages[0].startswith("run ") and "11 characters of input" in messages[0]
    assert "iteration 1 of at most 20" in messages and "iteration 2 of at most 20" in messages
    assert "iteration 1: sub-calls 3/3 done" in messages
    assert any(message.startswith("still working") for message in messages)
    assert progress.values == sorted(set(progress.values))  # strictly increasing, as the protocol requires


async def test_a_follow_up_with_the_session_id_finds_the_first_runs_variables(http_server: LiveServer) -> None:
    """The first call's result carries its session_id; a second call with it (and no input) reads a variable
    the first run made. Mutant caught: runs started without `settings.session` (no session_id comes back)."""
    first_prompt = script({"code": ["words = context.split()\nanswer.update(content=str(len(words)), ready=True)"]})
    follow_up = script({"code": ["answer.update(content=words[-1], ready=True)"]})
    async with http_client(http_server) as client:
        first = await client.call_tool("rlm_run", {"prompt": first_prompt, "input_text": "alpha beta gamma"})
        assert answer_text(first) == "3" and first.structured_content is not None
        session_id = first.structured_content["session_id"]
        assert any(session_id in getattr(block, "text", "") for block in first.content[1:])
        second = await client.call_tool("rlm_run", {"prompt": follow_up, "session_id": session_id})
        assert not second.is_error and answer_text(second) == "gamma"
        assert second.structured_content is not None and second.structured_content["session_id"] == session_id
        with_input = await client.call_tool(
            "rlm_run", {"prompt": follow_up, "session_id": session_id, "input_text": "more"}
        )
        unknown = await client.call_tool("rlm_run", {"prompt": follow_up, "session_id": "no-such-session"})
    assert with_input.is_error and "send no input" in answer_text(with_input)
    assert unknown.is_error and "no-such-session" in answer_text(unknown)


async def test_a_call_when_every_session_is_busy_is_answered_without_a_session(fake: FakeOpenAI) -> None:
    """RLM_MAX_SESSIONS sessions kept, each with a live run: a new call still runs (there are run slots) and
    says that no session was kept for follow-ups on its answer. Old behaviour (the attack pass): a tool error,
    "1 sessions are kept (RLM_MAX_SESSIONS) and none is idle; delete one (DELETE /api/sessions/{id})"."""
    settings = make_settings(fake, rlm_api_token=TOKEN, rlm_max_sessions=1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with LiveServer(settings) as server:
        busy = await anyio.to_thread.run_sync(
            lambda: start_detached(
                server.url, SLEEPS, until=lambda event: event.event == "code", settings={"session": True}, headers=auth
            )
        )
        async with http_client(server) as client:
            result = await client.call_tool("rlm_run", {"prompt": LENGTH, "input_text": "abcd"})
        cancelled = httpx2.post(f"{server.url}/api/runs/{busy[0].data['run_id']}/cancel", headers=auth, timeout=30)
    assert not result.is_error and answer_text(result) == "4", result
    assert result.structured_content is not None and "session_id" not in result.structured_content
    notes = [getattr(block, "text", "") for block in result.content[1:]]
    assert any("no session was kept for follow-ups" in note and "RLM_MAX_SESSIONS" in note for note in notes), notes
    assert cancelled.status_code == 202


async def test_over_http_the_token_is_required(http_server: LiveServer) -> None:
    """Mutant caught: `/mcp` routed without the token guard."""
    response = httpx2.post(
        f"{http_server.url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Accept": "application/json, text/event-stream"},
        timeout=30,
    )
    assert response.status_code == 401 and "RLM_API_TOKEN" in response.json()["detail"]
    with pytest.raises(Exception):  # noqa: B017 (the SDK wraps the 401 in transport-specific errors)
        async with http_client(http_server, "legacy", token="wrong") as client:
            await client.list_tools()


async def test_a_call_too_large_for_mcp_is_refused_with_a_message_the_client_shows(http_server: LiveServer) -> None:
    """The 413 of a body past /mcp's cap says where large inputs go; the SDK's client shows an error body only when
    it is a JSON-RPC error. Old behaviour caught (the attack pass): `{"detail": …}` alone, which the host's user saw
    as "Server returned an error response"."""
    async with http_client(http_server) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("rlm_run", {"prompt": "p", "input_text": "x" * (9 * 2**20)})
        after = await client.call_tool("rlm_run", {"prompt": LENGTH, "input_text": "abc"})
    assert "larger than /mcp allows (8,388,608 bytes)" in str(refused.value) and "/process" in str(refused.value)
    assert answer_text(after) == "3"


async def test_a_failed_run_is_a_tool_error_that_says_why(http_server: LiveServer, fake: FakeOpenAI) -> None:
    fake.inject("status", role="root", status=500, count=10)
    async with http_client(http_server) as client:
        result = await client.call_tool("rlm_run", {"prompt": "anything"})
        asked = fake.stats.root_requests
        blank = await client.call_tool("rlm_run", {"prompt": "   ", "input_text": "data"})
        # old behaviour: the argument, stdio's only, was dropped, and the run went on with no input
        path = await client.call_tool("rlm_run", {"prompt": "count the lines", "input_path": "/var/log/app.log"})
    assert result.is_error and "The run failed (model_unavailable)" in answer_text(result)
    assert path.is_error and "input_path" in answer_text(path) and "input_text" in answer_text(path)
    # old behaviour (the attack pass): a blank prompt started a run, as POST /process does not
    assert blank.is_error and "must not be empty" in answer_text(blank)
    assert fake.stats.root_requests == asked


async def cancel_a_call(server: LiveServer, mode: str, *, close_first: bool) -> LiveRun:
    """Start a call whose run sleeps, cancel it once the run is under way, and wait (up to 15 s) for the run to
    end: while the client is still connected, or once it has closed its connection (`close_first`)."""
    progress = Progress()
    async with http_client(server, mode) as client:
        async with anyio.create_task_group() as group:

            async def call() -> None:
                await client.call_tool("rlm_run", {"prompt": SLEEPS}, progress_callback=progress)

            group.start_soon(call)
            with anyio.fail_after(30):
                await progress.seen.wait()
            live = server.app.state.engine.runs.live()
            group.cancel_scope.cancel()
        assert len(live) == 1
        if not close_first:
            assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: live[0].ended, timeout=15))
    assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: live[0].ended, timeout=15))
    run: LiveRun = live[0]
    return run


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_cancelling_an_http_call_cancels_the_run(http_server: LiveServer, fake: FakeOpenAI, mode: str) -> None:
    """Mutant caught: the tool not cancelling its run when the call is cancelled (it sleeps on)."""
    terminal = (await cancel_a_call(http_server, mode, close_first=False)).events[-1]
    assert terminal.type == "error" and terminal.code == "cancelled"
    assert fake.stats.root_requests == 1


def test_a_2025_host_that_vanishes_mid_call_has_its_run_cancelled(http_server: LiveServer) -> None:
    """A host of the 2025 protocol (a session kept in the server's memory) starts a call and closes the
    connection that would carry its result, sending no cancel: nothing can ever receive that result (no event
    store to resume from), so the run is cancelled. Old behaviour caught (the attack pass): the SDK served the
    call on, and its run went on holding its slot and calling the model."""
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    engine = http_server.app.state.engine
    with httpx2.Client(base_url=http_server.url, timeout=30) as client:
        opened = client.post(
            "/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
        )
        assert opened.status_code == 200, opened.text
        headers |= {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "rlm_run", "arguments": {"prompt": SLEEPS}},
        }
        with client.stream("POST", "/mcp", headers=headers, json=call) as response:
            assert response.status_code == 200
            assert wait_until(lambda: len(engine.runs.live()) == 1, timeout=30)
            (run,) = engine.runs.live()
        # the stream is closed here, without a cancel notification; the session itself stays open
        assert wait_until(lambda: run.ended, timeout=15), "the run went on"
    assert run.events[-1].type == "error" and run.events[-1].code == "cancelled"


def test_the_mcp_sessions_kept_at_once_are_bounded(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_MCP_SESSIONS a new MCP session is refused with 503, and the open ones go on. Old behaviour (the attack
    pass): the SDK's 10,000, and 8,500 sessions opened with the token took the server from 302 to 626 MB."""
    monkeypatch.setattr(mcp_http, "MAX_MCP_SESSIONS", 3)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json, text/event-stream"}
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    with LiveServer(make_settings(fake, rlm_api_token=TOKEN)) as server, httpx2.Client(timeout=30) as client:
        opened = [client.post(f"{server.url}/mcp", headers=headers, json=initialize) for _ in range(4)]
        session = {
            **headers,
            "mcp-session-id": opened[0].headers["mcp-session-id"],
            "mcp-protocol-version": "2025-06-18",
        }
        listed = client.post(
            f"{server.url}/mcp", headers=session, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        )
    assert [response.status_code for response in opened] == [200, 200, 200, 503]
    assert listed.status_code == 200 and "rlm_run" in listed.text


def _server_pid() -> int:
    """The stdio server this test started: the child of this process running `rlm_service mcp`."""
    mine = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                parent = stat.read().rsplit(b")", 1)[1].split()[1].decode()
                args = cmdline.read().split(b"\0")
        except OSError:
            continue
        if parent == mine and b"rlm_service" in args and b"mcp" in args:
            return int(entry)
    raise AssertionError("the stdio server process was not found")


async def test_over_stdio_a_50_mb_local_file_is_spooled_without_growing_the_server(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The file goes to the run's spool a chunk at a time: the server's peak memory grows by far less than
    the file. Mutant caught: `spool_file` replaced by reading the file whole (the peak grows by > 100 MB)."""
    big = tmp_path / "big.log"
    line = b"2026-01-01 12:00:00 INFO request served in 12 ms\n"
    big.write_bytes(line * (50 * 1024 * 1024 // len(line)))
    size = big.stat().st_size
    progress = Progress()
    async with Client(stdio_params(fake, tmp_path)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "input_path" in tools["rlm_run"].input_schema["properties"]
        warm = await client.call_tool("rlm_run", {"prompt": LENGTH, "input_text": "warm up"})
        assert answer_text(warm) == "7"
        pid = _server_pid()
        before = peak_rss(pid)
        result = await client.call_tool(
            "rlm_run", {"prompt": LENGTH, "input_path": str(big)}, progress_callback=progress
        )
        after = peak_rss(pid)
        missing = await client.call_tool("rlm_run", {"prompt": LENGTH, "input_path": str(tmp_path / "nope")})
    assert not result.is_error and answer_text(result) == str(size)
    assert f"{size:,} characters of input" in progress.messages[0]
    assert after - before < 30 * 1024 * 1024, f"the server's peak memory grew by {(after - before) >> 20} MiB"
    assert missing.is_error and "no such file" in answer_text(missing)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_cancelling_a_stdio_call_cancels_the_run(fake: FakeOpenAI, tmp_path: Path, mode: str) -> None:
    """Mutant caught: the tool not cancelling its run when the call is cancelled (it stays `running`)."""
    progress = Progress()
    async with Client(stdio_params(fake, tmp_path), mode=mode) as client:
        async with anyio.create_task_group() as group:

            async def call() -> None:
                await client.call_tool("rlm_run", {"prompt": SLEEPS}, progress_callback=progress)

            group.start_soon(call)
            with anyio.fail_after(30):
                await progress.seen.wait()
            group.cancel_scope.cancel()
        status: dict[str, Any] = {}
        with anyio.fail_after(20):
            while status.get("status") != "cancelled":
                await anyio.sleep(0.2)
                listing = await client.read_resource("rlm://runs")
                runs = json.loads(getattr(listing.contents[0], "text", "{}"))["runs"]
                status = runs[0] if runs else {}
    assert status["error"]["code"] == "cancelled"
    assert fake.stats.root_requests == 1


LEASE_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
signal.signal(signal.SIGIO, lambda *_: print('opened', flush=True))  # the kernel's word: someone opens it
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:  # a file system without leases
    sys.exit(f'no lease: {exc}')
print('leased', flush=True)
sys.stdin.readline()
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
"""
"""Holds a write lease on a file: another process's open() of it waits in the kernel until the holder lets go
(or /proc/sys/fs/lease-break-time passes, 45 s by default). It says `opened` when an open() begins to wait."""


def hold_a_lease(path: Path) -> subprocess.Popen[str]:
    """LEASE_HOLDER on `path`: its lines in `stdout`; a line to its `stdin` lets the lease go."""
    return subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


async def test_a_stdio_call_cancelled_while_its_input_file_is_copied_leaves_no_copy(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The input file's copy (`upload-*.txt` in the server's TMPDIR) is made, then the file is opened: a lease
    held on the file keeps its open() waiting, the call is cancelled meanwhile, then the copy goes on to its end.
    The copy is removed once it ends. Old behaviour caught (the review): it stayed on disk until the process
    exited."""
    data = tmp_path / "data.txt"
    data.write_text("some lines\n" * 1000)
    server_tmp = private_tempdir()
    holder = hold_a_lease(data)
    assert holder.stdin is not None and holder.stdout is not None

    def copies() -> list[Path]:
        return sorted(server_tmp.rglob("upload-*"))

    try:
        if await anyio.to_thread.run_sync(holder.stdout.readline) != "leased\n":
            pytest.skip(f"no write lease on a file in {tmp_path} (exit status {holder.wait(10)})")
        async with Client(stdio_params(fake, tmp_path, TMPDIR=str(server_tmp))) as client:
            async with anyio.create_task_group() as group:

                async def call() -> None:
                    await client.call_tool("rlm_run", {"prompt": LENGTH, "input_path": str(data)})

                group.start_soon(call)
                with anyio.fail_after(30):  # the server's copy is made, and its open() of the file waits
                    assert await anyio.to_thread.run_sync(holder.stdout.readline) == "opened\n"
                assert len(copies()) == 1
                group.cancel_scope.cancel()
            await client.list_tools()  # answered after the server has read the cancel sent before it
            holder.stdin.write("\n")  # the lease is let go: the copy is made to its end
            holder.stdin.flush()
            assert await anyio.to_thread.run_sync(lambda: holder.wait(30)) == 0
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: copies() == [], timeout=15))
            stayed = copies()  # looked at while the server lives: at its exit its instance directory goes
    finally:
        holder.kill()
        holder.wait(10)
    assert stayed == [], "the cancelled call's copy of its input stayed on disk"
    assert fake.stats.root_requests == 0  # no run started


async def test_over_stdio_on_a_shared_postgresql_a_run_is_cancelled_through_a_replica(
    fake: FakeOpenAI, pg_url: str, tmp_path: Path
) -> None:
    """`rlm-service mcp` recording into the PostgreSQL database of a deployment's replicas: its run is listed by a
    replica, and cancelled through it (the call ends with a tool error saying so). Old behaviour caught: the stdio
    server recorded its runs without an owner, so the replica answered 409 "already ended" and, had the stdio
    process died, the run would have stayed `running` for ever."""
    progress = Progress()
    with spawn_server(tmp_path, model_url=fake.url, RLM_DATABASE_URL=pg_url) as replica:
        async with Client(stdio_params(fake, tmp_path, RLM_DATABASE_URL=pg_url)) as client:
            async with anyio.create_task_group() as group:

                async def cancel_through_the_replica() -> None:
                    with anyio.fail_after(60):
                        await progress.seen.wait()
                    runs = (await anyio.to_thread.run_sync(lambda: httpx2.get(f"{replica.url}/api/runs"))).json()
                    run_id = runs["runs"][0]["id"]
                    answered = await anyio.to_thread.run_sync(
                        lambda: httpx2.post(f"{replica.url}/api/runs/{run_id}/cancel", timeout=30)
                    )
                    assert answered.status_code == 202, answered.text

                group.start_soon(cancel_through_the_replica)
                with anyio.fail_after(60):
                    result = await client.call_tool("rlm_run", {"prompt": SLEEPS}, progress_callback=progress)
    assert result.is_error and "cancelled" in answer_text(result)


WHICH_PROCESS = script({"code": ["import os\nanswer.update(content=str(os.getppid()), ready=True)"]})


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_with_two_server_processes_every_call_is_served_whichever_process_it_reaches(
    tmp_path: Path, mode: str
) -> None:
    """WEB_CONCURRENCY=2: MCP clients on fresh connections (as behind a round-robin proxy) reach either process;
    every call is answered, until both processes have run one (each run's worker names its zygote, one per
    process). Mutant caught: the SDK's sessions kept in the process that opened them (a 2025-handshake client
    whose next request reaches the other process gets `Session not found`)."""

    async def one_client(url: str) -> list[str]:
        http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(30, read=120), limits=httpx2.Limits(max_keepalive_connections=0)
        )
        async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:
            results = [await client.call_tool("rlm_run", {"prompt": WHICH_PROCESS, "input_text": "x"}) for _ in "ab"]
        assert not any(result.is_error for result in results)
        return [answer_text(result) for result in results]

    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        zygotes: set[str] = set()
        deadline = time.monotonic() + 60  # the second process may still be starting when the first answers
        while len(zygotes) < 2 and time.monotonic() < deadline:
            zygotes.update(await one_client(server.url))  # fresh connections land on either listening process
    assert len(zygotes) == 2


async def test_with_several_processes_a_2025_host_that_closes_its_connection_cancels_the_run(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Where `/mcp` keeps nothing between requests (a process of an instance of several), a 2025-protocol
    host's cancel notification finds no call to cancel, but closing its connection ends the run. Mutant
    caught: the tool not cancelling its run when its request goes away (the run sleeps on)."""
    settings = make_settings(fake, web_concurrency=2, rlm_history_db=str(tmp_path / "h.sqlite3"), rlm_api_token=TOKEN)
    with LiveServer(settings) as server:
        terminal = (await cancel_a_call(server, "legacy", close_first=True)).events[-1]
    assert terminal.type == "error" and terminal.code == "cancelled"


async def test_with_two_server_processes_a_follow_up_is_served_whichever_process_it_reaches(tmp_path: Path) -> None:
    """WEB_CONCURRENCY=2: a first call keeps its session in one process; ten follow-ups, each on a fresh
    connection (so each reaches either process), all find the first run's variables. Old behaviour caught: a
    follow-up that reached the process not keeping the session failed with 'no session' (6 of 10 measured; all
    ten reaching the keeper has a chance of 1 in 1024)."""
    first_prompt = script({"code": ["words = context.split()\nanswer.update(content=str(len(words)), ready=True)"]})
    follow_up = script({"code": ["answer.update(content=words[-1], ready=True)"]})

    async def call(url: str, arguments: dict[str, Any]) -> CallToolResult:
        http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(30, read=120), limits=httpx2.Limits(max_keepalive_connections=0)
        )
        async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy") as client:
            return await client.call_tool("rlm_run", arguments)

    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        first = await call(server.url, {"prompt": first_prompt, "input_text": "alpha beta gamma"})
        assert first.structured_content is not None
        session_id = first.structured_content["session_id"]
        follow_ups = [await call(server.url, {"prompt": follow_up, "session_id": session_id}) for _ in range(10)]
    assert [answer_text(result) for result in follow_ups] == ["gamma"] * 10
    assert all(result.structured_content is not None for result in follow_ups)
    assert {result.structured_content["session_id"] for result in follow_ups if result.structured_content} == {
        session_id
    }


async def call_while_stopping(client: Client, arguments: dict[str, Any], server: RealServer) -> CallToolResult:
    """`rlm_run` with `arguments`, and SIGTERM to `server` once the call's run is under way (its first iteration
    reported)."""
    progress = Progress()
    async with anyio.create_task_group() as group:

        async def stop_once_under_way() -> None:
            with anyio.fail_after(60):
                await progress.seen.wait()
            server.process.send_signal(signal.SIGTERM)

        group.start_soon(stop_once_under_way)
        result = await client.call_tool("rlm_run", arguments, progress_callback=progress)
        group.cancel_scope.cancel()  # (a call that ended before its run was under way: the caller's assertions say how)
    return result


async def test_a_call_waiting_when_the_instance_stops_gets_a_tool_error_saying_so(tmp_path: Path) -> None:
    """SIGTERM to the supervisor of two server processes while an `rlm_run` call's run hangs in a cell: the call
    ends with a tool error saying that the server is shutting down, and the instance exits. Old behaviour
    caught: the call failed in the client's transport, with no result (its run was cancelled only once uvicorn's
    grace for open connections had cut the request)."""
    with spawn_server(tmp_path, WEB_CONCURRENCY="2") as server:
        assert wait_until(lambda: len(_listening(server)) == 2, timeout=60)
        async with http_client(server) as client:
            result = await call_while_stopping(client, {"prompt": SLEEPS}, server)
        assert result.is_error and "shutting down" in answer_text(result)
        assert await anyio.to_thread.run_sync(lambda: server.process.wait(60)) == 0


async def test_a_follow_up_through_a_replica_that_stops_gets_a_tool_error_saying_so(
    pg_url: str, tmp_path: Path
) -> None:
    """Two replicas on PostgreSQL; an MCP follow-up on a session the first keeps goes through the second, and
    its run hangs in a cell in the first. SIGTERM to the second: the call ends with a tool error saying that the
    server is shutting down, and the run is cancelled where it runs. Old behaviour caught: the call failed in
    the client's transport (`SSE stream ended without a response`): the stopping replica had no run of its own
    to wait for, and ended its streams at once."""
    with replicas(tmp_path, pg_url, timeout_s=NO_DEATH_TIMEOUT_S) as (keeper, other):
        async with http_client(keeper, "legacy") as client:
            first = await client.call_tool("rlm_run", {"prompt": LENGTH, "input_text": "abc"})
        assert first.structured_content is not None
        session_id = first.structured_content["session_id"]
        async with http_client(other, "legacy") as client:
            result = await call_while_stopping(client, {"prompt": SLEEPS, "session_id": session_id}, other)
        assert result.is_error and "shutting down" in answer_text(result)
        await anyio.to_thread.run_sync(lambda: other.process.wait(60))  # (ended by its SIGTERM, uvicorn's way)

        def follow_up_status() -> str:
            runs = httpx2.get(f"{keeper.url}/api/runs", timeout=30).json()["runs"]
            return str(runs[0]["status"]) if len(runs) == 2 else "missing"

        assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: follow_up_status() == "cancelled", 30))
