"""The benchmarks B1–B8 of BENCHMARKS.md, each a function of its sizes.

`bench/run.py` calls them at full size and writes the table; `tests/test_bench_smoke.py` calls them
at tiny sizes so they cannot rot. Every figure comes from a real run against the fake OpenAI server
in its own process (tests/fake_openai.py) with the stated latency. Each result counts its `failures`:
calls that failed, runs that did not end with a ready `final`, workers that did not start. A figure
measured on failed work is no figure: `bench/run.py` marks its verdict "failed".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import openai

from bench.common import ROOT, FakeServer, MachineBusy, Stopwatch, rss_bytes, server_heap
from rlm_service.config import Settings
from rlm_service.engine import Engine
from rlm_service.inputs import InputSpooler, RunInput
from rlm_service.llm import ChatClient, Completion, SubcallSession
from rlm_service.repl.base import ReplOptions
from rlm_service.repl.subprocess_repl import SubprocessBackend
from rlm_service.repl.workspace import Workspace

RLMS_PYTHON = ROOT / "bench" / ".venv-rlms" / "bin" / "python"


class SessionCalls:
    """A cell's sub-calls served by one `SubcallSession` (what a run's controller does)."""

    def __init__(self, session: SubcallSession) -> None:
        self.session = session

    async def batch(self, prompts: list[str]) -> list[str]:
        return await self.session.batch(prompts)

    async def rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        return await self.session.batch(prompts)


class NoCalls:
    """Sub-calls for a cell that makes none."""

    async def batch(self, prompts: list[str]) -> list[str]:
        return prompts

    async def rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        return prompts


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_base": url,
        "openai_model_name": "root-model",
        "openai_sub_model_name": "sub-model",
        "openai_api_key": "sk-bench",
        "rlm_max_subcalls": 100_000,
        "rlm_exec_timeout_s": 600,
        "rlm_max_iterations": 50,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def script(*turns: dict[str, Any]) -> str:
    return f"benchmark <<<SCRIPT {json.dumps(list(turns))} SCRIPT>>>"


class OpenAISDKClient:
    """The same sub-calls through the `openai` SDK (over httpx2), to compare with our aiohttp client."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.sdk = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", http_client=http, max_retries=0)

    async def complete(self, model: str, prompt: str) -> Completion:
        reply = await self.sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])
        usage = reply.usage
        return Completion(
            reply.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )


def _cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds (user + system) a process has used; with `reaped`, its children that ended too."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and everything below it, living or ended (the server, its zygote, workers)."""
    return _cpu(pid) + sum(_cpu(child, reaped=True) for child in _descendants(pid))


async def _batch_through_repl(
    url: str, n: int, concurrency: int, *, sdk: bool = False, sequential: bool = False, warm: bool = False
) -> dict[str, float]:
    """llm_batch (or a loop of llm_query) from generated code in a worker, served by the server side.

    `warm`: first open the connections with an untimed batch, as a running server's pool already has.
    """
    limits = httpx2.Limits(max_connections=2048, max_keepalive_connections=512)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        client: Any = OpenAISDKClient(http, url) if sdk else ChatClient(url, "sk-bench")
        if warm:
            await SubcallSession(client, "sub-model", max_calls=concurrency, concurrency=concurrency).batch(
                ["warm-up"] * concurrency
            )
        session = SubcallSession(client, "sub-model", max_calls=n, concurrency=concurrency)
        workspace = Workspace.create()
        workspace.write_input("x")
        repls = SubprocessBackend([])
        repl = repls.make(workspace, ReplOptions())
        await repl.start()
        try:
            pid = repl._worker.process.pid  # type: ignore[attr-defined]
            if sequential:
                code = f"r = [llm_query(f'prompt {{i}}') for i in range({n})]\nsum(x.startswith('Error') for x in r)"
            else:
                code = f"r = llm_batch([f'prompt {{i}}' for i in range({n})])\nsum(x.startswith('Error') for x in r)"
            worker_cpu = _cpu(pid)
            with Stopwatch() as watch:
                outcome = await repl.execute(code, 600, SessionCalls(session))
            worker_cpu = _cpu(pid) - worker_cpu
        finally:
            await repl.close()
            await repls.close()
            workspace.remove()
            if isinstance(client, ChatClient):
                await client.aclose()
    return {
        "wall_s": watch.seconds,
        "server_cpu_s": watch.cpu,
        "worker_cpu_s": worker_cpu,
        "errors": float(outcome.stdout or 0) if outcome.error is None else float(n),
    }


def b1_batch(server: FakeServer, *, n: int, concurrency: int, latency: float) -> dict[str, Any]:
    """B1: llm_batch of n prompts at a given concurrency and latency, ours (httpx2 and openai SDK) and rlms."""
    ideal = n / concurrency * latency
    ours = asyncio.run(_batch_through_repl(server.url, n, concurrency))
    sdk = asyncio.run(_batch_through_repl(server.url, n, concurrency, sdk=True))
    result: dict[str, Any] = {
        "ideal_s": ideal,
        "ours_wall_s": ours["wall_s"],
        "ours_ratio": ours["wall_s"] / ideal,
        "ours_cpu_ms_per_call": 1000 * (ours["server_cpu_s"] + ours["worker_cpu_s"]) / n,
        "ours_errors": ours["errors"],
        "sdk_wall_s": sdk["wall_s"],
        "sdk_ratio": sdk["wall_s"] / ideal,
        "sdk_cpu_ms_per_call": 1000 * (sdk["server_cpu_s"] + sdk["worker_cpu_s"]) / n,
        "sdk_errors": sdk["errors"],
    }
    rlms = run_rlms("b1", "--url", server.url, "--n", str(n), "--concurrency", str(concurrency))
    if rlms is not None and "error" in rlms:
        result["rlms_errors"] = n
    elif rlms is not None:
        result.update(
            rlms_wall_s=rlms["wall_s"],
            rlms_ratio=rlms["wall_s"] / ideal,
            rlms_cpu_ms_per_call=1000 * rlms["cpu_s"] / n,
            rlms_errors=rlms["errors"],
        )
    result["failures"] = result["ours_errors"] + result["sdk_errors"] + result.get("rlms_errors", 0)
    return result


def b2_speedup(server: FakeServer, *, n: int, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """B2: n sub-calls one at a time, then as one llm_batch at each concurrency, with the connection
    pool warm (as in a running server) and cold (the first batch of a fresh process)."""
    one_by_one = asyncio.run(_batch_through_repl(server.url, n, 1, sequential=True, warm=True))
    sequential = one_by_one["wall_s"]
    result: dict[str, Any] = {"sequential_s": sequential, "failures": one_by_one["errors"]}
    for concurrency in concurrencies:
        for pool, warm in (("", True), ("_cold", False)):
            batch = asyncio.run(_batch_through_repl(server.url, n, concurrency, warm=warm))
            result[f"batch{concurrency}{pool}_s"] = batch["wall_s"]
            result[f"speedup{concurrency}{pool}"] = sequential / batch["wall_s"]
            result["failures"] += batch["errors"]
    return result


def ended_ready(events: list[Any]) -> bool:
    """Whether a run's events end with a `final` whose answer is ready."""
    return bool(events) and events[-1].type == "final" and events[-1].ready


async def _scripted_run(url: str, iterations: int, **overrides: Any) -> tuple[float, list[Any]]:
    turns = [{"code": [f"x_{i} = {i}"]} for i in range(iterations - 1)]
    turns.append({"code": ["answer.update(content='done', ready=True)"]})
    async with Engine(settings_for(url, **overrides)) as engine:
        with Stopwatch() as watch:
            events = [event async for event in engine.run(script(*turns), "input")]
    return watch.seconds, events


def b3_overhead(server: FakeServer, *, iterations: int, short: int = 5) -> dict[str, Any]:
    """B3: the cost of one root iteration at zero model latency.

    `<name>_ms`: the steady state, the median time between consecutive iterations of one run (from
    the events' timestamps), so one-time costs (clients, worker start) are left out. `<name>_total_ms`:
    a whole run's wall time divided by its iterations, one-time costs included. rlms has no events:
    its steady state is the slope between a long and a short run, `rlms_ms`. Model time is excluded
    from all of them: the fake server's own CPU time per request (`<name>_fake_ms`) is subtracted. Our
    runs have the collector set as the service's process sets it (`server_heap`).
    """
    result: dict[str, Any] = {"failures": 0}
    for name, overrides in (
        ("subprocess_tools", {}),
        ("inprocess_tools", {"rlm_repl": "inprocess"}),
        ("subprocess_text", {"rlm_root_protocol": "text"}),
    ):
        fake_cpu = _cpu(server.pid)
        with server_heap():
            wall, events = asyncio.run(_scripted_run(server.url, iterations, **overrides))
        if not ended_ready(events) or events[-1].iterations != iterations:
            result["failures"] += 1
            continue
        fake_ms = 1000 * (_cpu(server.pid) - fake_cpu) / iterations
        stamps = [event.ts for event in events if event.type == "usage"]
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        result[f"{name}_ms"] = 1000 * statistics.median(gaps) - fake_ms
        result[f"{name}_total_ms"] = 1000 * wall / iterations - fake_ms
        result[f"{name}_fake_ms"] = fake_ms
    fake_cpu = _cpu(server.pid)
    long_run = run_rlms("b3", "--url", server.url, "--iterations", str(iterations))
    long_fake_ms = 1000 * (_cpu(server.pid) - fake_cpu)
    short_run = run_rlms("b3", "--url", server.url, "--iterations", str(short))
    if long_run is not None and short_run is not None:
        if "error" in long_run or "error" in short_run:
            result["failures"] += 1
        else:
            extra = long_run["iterations"] - short_run["iterations"]
            fake_ms = long_fake_ms / long_run["iterations"]
            result["rlms_ms"] = 1000 * (long_run["wall_s"] - short_run["wall_s"]) / extra - fake_ms
            result["rlms_total_ms"] = long_run["per_iteration_ms"] - fake_ms
    return result


def b4_worker_start(*, starts: int) -> dict[str, Any]:
    """B4: time from spawning a worker to its `ready` (sandbox applied, context loaded); after the clock
    stops, each worker must run a cell that sees its whole `context`, or it counts as a failure."""

    async def measure() -> tuple[list[float], int]:
        times, failures = [], 0
        repls = SubprocessBackend([])
        for _ in range(starts + 1):
            workspace = Workspace.create()
            workspace.write_input("x" * 1000)
            repl = repls.make(workspace, ReplOptions())
            with Stopwatch() as watch:
                await repl.start()
            times.append(watch.seconds)
            outcome = await repl.execute("len(context)", 60, NoCalls())
            failures += outcome.stdout != "1000"
            await repl.close()
            workspace.remove()
        await repls.close()
        return times[1:], failures  # the first start also starts the zygote, once per server

    times, failures = asyncio.run(measure())
    ordered = sorted(times)
    return {
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "starts": len(times),
        "failures": failures,
    }


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`: the zygote, and the workers it forked."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


class _PeakRss(threading.Thread):
    """Samples the RSS of a process and all its descendants every few milliseconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            total = rss_bytes(self.pid) + sum(rss_bytes(child) for child in _descendants(self.pid))
            self.peak = max(self.peak, total)
            time.sleep(0.01)


def _write_input_file(path: Path, size: int) -> None:
    line = b"2026-11-28T12:00:00Z INFO request served in 12 ms path=/api/items status=200 bytes=5120\n"
    block = line * (4 * 1024 * 1024 // len(line))
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            piece = block[: size - written]
            handle.write(piece)
            written += len(piece)


def _sendfile_upload(port: int, path: Path, prompt: str) -> tuple[socket.socket, float]:
    """POST /process as multipart with the file sent by the kernel (sendfile), so that the client costs
    next to nothing and the figure is the server's. Returns the socket (response pending) and the time
    until the response headers, which the server sends only once the whole body is parsed and spooled."""
    boundary = "rlm-bench-boundary"
    before = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{prompt}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="input_file"; filename="upload.log"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    after = f"\r\n--{boundary}--\r\n".encode()
    length = len(before) + path.stat().st_size + len(after)
    head = (
        f"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    sock.sendall(head + before)
    with open(path, "rb") as handle:
        sock.sendfile(handle)
    sock.sendall(after)
    sock.recv(1, socket.MSG_PEEK)
    return sock, time.perf_counter() - started


def b5_large_upload(*, size: int, work: Path) -> dict[str, Any]:
    """B5: a multipart upload of `size` bytes to the real server; throughput, latencies, peak RSS."""
    from tests.conftest import parse_sse, spawn_server

    source = work / "upload.log"
    _write_input_file(source, size)
    prompt = script({"code": ["print(len(context))"]}, {"code": ["answer.update(content='ok', ready=True)"]})
    limits = {"RLM_MAX_INPUT_BYTES": str(size + 1024), "RLM_WORKER_MEMORY_MB": str(size // 2**20 + 1024)}
    marks: dict[str, float] = {}
    first_output = None
    terminal = None
    with spawn_server(work, **limits) as srv:
        sampler = _PeakRss(srv.pid)
        sampler.start()
        started = time.perf_counter()
        sock, marks["headers"] = _sendfile_upload(int(srv.url.rsplit(":", 1)[1]), source, prompt)
        with sock, sock.makefile("r", encoding="utf-8", newline="\n") as stream:
            status = stream.readline()
            if " 200 " not in status:
                raise RuntimeError(f"upload refused: {status.strip()}")
            lines = (line.rstrip("\r\n") for line in stream)
            for line in lines:  # the response head, up to its blank line
                if not line:
                    break
            for event in parse_sse(line for line in lines if not _is_chunk_size(line)):
                marks.setdefault(event.event, time.perf_counter() - started)
                if event.event == "output" and first_output is None:
                    first_output = event.data["stdout"].strip()
                if event.event in ("final", "error"):
                    terminal = event
                    break
        sampler.running = False
        sampler.join()
    source.unlink()
    ok = first_output == str(size) and terminal is not None and terminal.event == "final" and terminal.data["ready"]
    return {
        "size_mb": size / 1e6,
        "throughput_mb_s": size / 1e6 / marks["headers"],
        "start_s": marks["start"],
        "first_output_s": marks["output"],
        "peak_rss_mb": sampler.peak / 2**20,
        "rss_budget_mb": (1.5 * size + 300 * 2**20) / 2**20,
        "failures": int(not ok),
    }


def _is_chunk_size(line: str) -> bool:
    """Chunked transfer encoding puts hexadecimal sizes between the SSE lines; SSE lines never look so."""
    return bool(line) and all(c in "0123456789abcdefABCDEF" for c in line)


async def _tokens_for(url: str, size: int, iterations: int) -> tuple[int, int, bool]:
    spooler = InputSpooler(size + 1024)
    line = "2026-11-28 INFO a log line of some length for the zero-rot benchmark\n"
    block = (line * (1024 * 1024 // len(line) + 1)).encode()
    remaining = size
    while remaining > 0:
        piece = block[: min(remaining, len(block))]
        spooler.feed(piece)
        remaining -= len(piece)
    run_input: RunInput = spooler.finish()
    turns = [{"code": [f"print(len(context) > {i})"]} for i in range(iterations - 1)]
    turns.append({"code": ["answer.update(content='done', ready=True)"]})
    async with Engine(
        settings_for(url, rlm_worker_memory_mb=size // 2**20 + 1024, rlm_max_input_bytes=size + 2048)
    ) as engine:
        events = [event async for event in engine.run(script(*turns), run_input)]
    usage = [event for event in events if event.type == "usage"]
    ok = ended_ready(events) and events[-1].iterations == iterations
    return usage[0].root.input_tokens, usage[-1].root.input_tokens, ok


def b6_zero_rot(server: FakeServer, *, sizes: tuple[int, ...], iterations: int) -> dict[str, Any]:
    """B6: root input tokens at iteration 1 and over the run, per input size; vs input in the prompt."""
    by_size: dict[int, dict[str, int]] = {}
    failures = 0
    for size in sizes:
        first, total, ok = asyncio.run(_tokens_for(server.url, size, iterations))
        by_size[size] = {"first": first, "total": total, "in_prompt": size // 4}
        failures += not ok
    firsts = [value["first"] for value in by_size.values()]
    totals = [value["total"] for value in by_size.values()]
    result: dict[str, Any] = {
        "failures": failures,
        "first_spread_pct": 100 * (max(firsts) / min(firsts) - 1),
        "total_spread_pct": 100 * (max(totals) / min(totals) - 1),
    }
    for size, value in by_size.items():
        result.update({f"{key}_{size}": number for key, number in value.items()})
    return result


def b7_b8_concurrent_runs(
    server: FakeServer, *, runs: int, batch: int, work: Path, processes: int = 1
) -> dict[str, Any]:
    """B7 and B8: `runs` runs at once through the real service, each 3 iterations and an llm_batch;
    wall time against one run alone, and how long events take from creation to the client. Two bursts on
    one server: the first ("cold") opens the connections to the model server, the second ("warm") finds
    them in the pool, as a running server does. `processes`: WEB_CONCURRENCY (the server CPU is then that of
    every server process and their supervisor)."""
    from tests.conftest import spawn_server

    prompt = b7_prompt(batch)

    failed: list[str] = []
    busy = MachineBusy()

    def measure(url: str, count: int) -> tuple[Stopwatch, list[float], float]:
        return asyncio.run(burst(url, prompt, count, batch=batch, failed=failed, busy=busy))

    env = {"RLM_MAX_CONCURRENT_RUNS": str(runs + 4), "RLM_SUBCALL_CONCURRENCY": "16", "WEB_CONCURRENCY": str(processes)}
    with spawn_server(work, model_url=server.url, **env) as srv, busy:
        pid = srv.process.pid
        wait_for_processes(pid, processes)
        alone = [measure(srv.url, 1) for _ in range(3)]
        cold, cold_delays, _ = measure(srv.url, runs)  # the first burst opens the connections
        before = (*service_cpu(pid), _cpu(server.pid))
        warm, delays, last_batch_s = measure(srv.url, runs)
        after = (*service_cpu(pid), _cpu(server.pid))
    single = statistics.median(watch.seconds for watch, _, _ in alone)
    server_s, workers_s, model_s = (end - start for start, end in zip(before, after, strict=True))
    share = (server_s + workers_s + model_s + warm.cpu) / ((os.cpu_count() or 1) * warm.seconds)
    return {
        "single_s": single,
        "together_s": warm.seconds,
        "ratio": warm.seconds / single,
        "cold_s": cold.seconds,
        "cold_ratio": cold.seconds / single,
        "last_batch_start_s": last_batch_s,
        "single_batch_start_s": statistics.median(start for _, _, start in alone),
        **_percentiles("sse", delays),
        **_percentiles("cold_sse", cold_delays),
        "events": len(delays),
        # CPU per run during the warm burst, by process: the service's, and the benchmark's own
        "server_cpu_ms": 1000 * server_s / runs,
        "workers_cpu_ms": 1000 * workers_s / runs,
        "model_cpu_ms": 1000 * model_s / runs,
        "client_cpu_ms": 1000 * warm.cpu / runs,
        "machine_busy_pct": 100 * share,
        "serial_busy_pct": busy.serial,
        "runs": 3 + 2 * runs,
        "failures": len(failed),
    }


def b7_prompt(batch: int) -> str:
    """B7's run: 3 iterations, the second an `llm_batch` of `batch` prompts."""
    return script(
        {"code": ["print(len(context))"]},
        {"code": [f"r = llm_batch([f'q {{i}}' for i in range({batch})])\nprint(len(r))"]},
        {"code": ["answer.update(content='done', ready=True)"]},
    )


async def _stream_one(
    client: httpx2.AsyncClient, url: str, prompt: str, delays: list[float], batch: int, failed: list[str]
) -> float:
    """Streams one run; returns when (server time) its batch started: its first `subcalls` event. A run that
    does not end with a ready `final` whose batch got all its `batch` replies is noted in `failed`."""
    batch_started = 0.0
    last: tuple[str, dict[str, Any]] | None = None
    replies = None
    async with client.stream("POST", f"{url}/process", json={"prompt": prompt, "input_data": "x"}) as response:
        async for sse in httpx2.EventSource(response):
            if sse.data:
                data = json.loads(sse.data)
                delays.append(time.time() - data["ts"])
                if sse.event == "subcalls" and not batch_started:
                    batch_started = data["ts"]
                if sse.event == "subcalls":
                    replies = (data["done"], data["failed"])
                last = (sse.event, data)
    if last is None or last[0] != "final" or not last[1]["ready"] or replies != (batch, 0):
        failed.append(f"{last and last[0]}: {last and last[1]}; sub-calls done, failed: {replies}")
    return batch_started


async def burst(
    url: str, prompt: str, count: int, *, batch: int, failed: list[str], busy: MachineBusy | None = None
) -> tuple[Stopwatch, list[float], float]:
    """`count` runs at once of a B7 run (`b7_prompt(batch)`), each streamed by its client: the burst's
    stopwatch, its delivery delays, and how long after its start the last batch started; failed runs are
    noted in `failed`. With `busy`, `busy.serial` becomes the share of the cores busy until then."""
    delays: list[float] = []
    async with httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=count + 4)) as client:
        began = time.time()
        with Stopwatch() as watch:
            starts = await asyncio.gather(
                *(_stream_one(client, url, prompt, delays, batch, failed) for _ in range(count))
            )
    if busy is not None:
        busy.serial = busy.share(began, max(starts))
    return watch, delays, max(starts) - began


def wait_for_processes(pid: int, processes: int, timeout: float = 60) -> None:
    """Until a service started as `pid` with WEB_CONCURRENCY=`processes` has all its server processes."""
    deadline = time.monotonic() + timeout
    while len(server_processes(pid)) < (processes + 1 if processes > 1 else 1):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start {processes} server processes")
        time.sleep(0.1)


def server_processes(pid: int) -> list[int]:
    """The server processes of a service started as `pid`: itself, or with WEB_CONCURRENCY > 1 its children
    that serve (not its zygotes and workers)."""
    found = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as command:
                serving = b"main.py" in command.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and serving:
            found.append(int(entry))
    return found


def service_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a service started as `pid`: its server processes (with their supervisor); and
    everything below them (zygotes and REPL workers, ended ones included)."""
    servers = sum(_cpu(process) for process in server_processes(pid))
    return servers, _tree_cpu(pid) - servers


def b7_agent_floor(*, runs: int, turns: int = 3) -> dict[str, Any]:
    """What PydanticAI's agent graph alone costs for one B7 run: the service's agent (`build_agent`) driven
    node by node as the controller does, `turns` tool calls and no more, by a `FunctionModel` (no HTTP, no
    mapping to the OpenAI format) whose tool returns at once (no REPL). `runs` runs at once, after the
    warm-up; CPU per run, with the collector set as the server's process sets it."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import UsageLimits

    from rlm_service.controller import build_agent

    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = sum(1 for message in messages if message.kind == "response")
        if done < turns:
            return ModelResponse(parts=[ToolCallPart("run_python", {"code": f"x = {done}"})])
        return ModelResponse(parts=[TextPart("done")])

    class Cells:
        async def run_cell(self, code: str) -> str:
            return "ok"

    agent = build_agent(FunctionModel(reply), "tools")

    async def one() -> None:
        async with agent.iter("task", deps=Cells(), usage_limits=UsageLimits(request_limit=turns + 2)) as run:  # type: ignore[arg-type]
            node, calls = run.next_node, 0
            while not Agent.is_end_node(node) and calls < turns:
                calls += Agent.is_call_tools_node(node)
                node = await run.next(node)

    async def measure() -> float:
        await asyncio.gather(*(one() for _ in range(runs)))  # warm-up
        cpu = time.process_time()
        await asyncio.gather(*(one() for _ in range(runs)))
        return (time.process_time() - cpu) / runs

    with server_heap():
        per_run = asyncio.run(measure())
    return {"cpu_ms": 1000 * per_run, "burst_s": runs * per_run}


def _percentiles(name: str, delays: list[float]) -> dict[str, float]:
    ordered = sorted(delays)
    return {
        f"{name}_p50_ms": 1000 * ordered[len(ordered) // 2],
        f"{name}_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def run_rlms(*args: str) -> dict[str, Any] | None:
    """Run bench/rlms_side.py in the rlms virtualenv; None when that venv is not set up, `{"error": …}`
    when the run failed."""
    if not RLMS_PYTHON.exists():
        return None
    result = subprocess.run(
        [str(RLMS_PYTHON), str(ROOT / "bench" / "rlms_side.py"), *args], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return {"error": result.stderr[-2000:]}
    return dict(json.loads(result.stdout))


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rlm-bench-"))
