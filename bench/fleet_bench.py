"""B11 and B12 of BENCHMARKS.md: many runs at realistic model latencies across server processes, and a replica
that dies in the middle of a burst. Each is a function of its sizes (`bench/run.py` calls them at full size,
`tests/test_bench_smoke.py` at tiny ones)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2

from bench.benchmarks import _cpu, b7_prompt, burst, script, service_cpu, wait_for_processes
from bench.common import FakeServer


def b11_realistic(
    server: FakeServer, *, runs: int, batch: int, work: Path, processes: int, database_url: str | None = None
) -> dict[str, Any]:
    """B11: `runs` runs at once (B7's run) against a model server with realistic latencies, through a service of
    `processes` server processes (SQLite history, or PostgreSQL at `database_url`): the warm burst's wall time
    against one run alone, and the service's CPU per run in that burst."""
    from tests.conftest import spawn_server

    prompt = b7_prompt(batch)
    env = {"RLM_MAX_CONCURRENT_RUNS": str(runs + 4), "RLM_SUBCALL_CONCURRENCY": "16", "WEB_CONCURRENCY": str(processes)}
    if database_url is not None:
        env["RLM_DATABASE_URL"] = database_url
    failed: list[str] = []
    with spawn_server(work, model_url=server.url, **env) as srv:
        pid = srv.process.pid
        wait_for_processes(pid, processes)
        alone = [asyncio.run(burst(srv.url, prompt, 1, batch=batch, failed=failed))[0].seconds for _ in range(2)]
        asyncio.run(burst(srv.url, prompt, runs, batch=batch, failed=failed))  # opens the model connections
        before = (*service_cpu(pid), _cpu(server.pid))
        warm, _, _ = asyncio.run(burst(srv.url, prompt, runs, batch=batch, failed=failed))
        after = (*service_cpu(pid), _cpu(server.pid))
    server_s, workers_s, model_s = (end - start for start, end in zip(before, after, strict=True))
    single = statistics.median(alone)
    return {
        "single_s": single,
        "together_s": warm.seconds,
        "ratio": warm.seconds / single,
        "server_cpu_ms": 1000 * server_s / runs,
        "workers_cpu_ms": 1000 * workers_s / runs,
        "model_cpu_ms": 1000 * model_s / runs,
        "runs": 2 + 2 * runs,
        "failures": len(failed),
    }


def long_prompt(turns: int, sleep_s: float) -> str:
    """A run of `turns` cells that each sleep `sleep_s`, then an answer."""
    return script(
        *[{"code": [f"import time\ntime.sleep({sleep_s})\nprint({i})"]} for i in range(turns)],
        {"code": ["answer.update(content='done', ready=True)"]},
    )


async def _run_then_reattach(
    client: httpx2.AsyncClient, owner: str, other: str, prompt: str, started: asyncio.Event, ids: list[str]
) -> tuple[str, float]:
    """A client of the replica that will die: streams its run; when the connection breaks, re-attaches to the
    other replica (as a balancer would send it) after the last event it saw. Its terminal event (an error's
    code) and when it came (monotonic)."""
    last = 0
    try:
        async with client.stream("POST", f"{owner}/process", json={"prompt": prompt}) as response:
            async for sse in httpx2.EventSource(response):
                data = json.loads(sse.data)
                last = data["seq"]
                if sse.event == "start":
                    ids.append(data["run_id"])
                    started.set()
                if sse.event in ("final", "error"):
                    return data.get("code", sse.event), time.monotonic()
    except httpx2.TransportError:
        pass
    if not ids:
        return "never started", time.monotonic()
    while True:
        try:
            return await _follow(client, other, ids[0], last)
        except httpx2.TransportError:
            await asyncio.sleep(0.1)


async def _follow(client: httpx2.AsyncClient, url: str, run_id: str, after: int) -> tuple[str, float]:
    """`GET /api/runs/{id}/events` to the terminal event: its name (an error's code) and when it came."""
    async with client.stream("GET", f"{url}/api/runs/{run_id}/events", params={"after": after}) as response:
        async for sse in httpx2.EventSource(response):
            if sse.event in ("final", "error"):
                return json.loads(sse.data).get("code", sse.event), time.monotonic()
    return "none", time.monotonic()


async def _run(client: httpx2.AsyncClient, url: str, prompt: str) -> tuple[str, float]:
    async with client.stream("POST", f"{url}/process", json={"prompt": prompt}) as response:
        async for sse in httpx2.EventSource(response):
            if sse.event in ("final", "error"):
                return json.loads(sse.data).get("code", sse.event), time.monotonic()
    return "none", time.monotonic()


def b12_failover(
    server: FakeServer,
    *,
    database_url: str,
    runs_each: int,
    timeout_s: float,
    turns: int,
    work: Path,
    settle_s: float | None = None,
) -> dict[str, Any]:
    """B12: two replicas on one PostgreSQL database, `runs_each` runs started on each; each run of the first
    is also followed through the second. Mid-burst the first is killed with SIGKILL: how long after the kill
    every follower of its runs (and every one of its clients, re-attached to the second) got its terminal
    event, and whether the second's runs all finished. `settle_s`: how long the replicas run before the burst
    (RLM_REPLICA_TIMEOUT_S by default: a replica sweeps once its heartbeats have gone through that long)."""
    from tests.conftest import spawn_server

    prompt = long_prompt(turns, 0.5)
    env = {
        "RLM_DATABASE_URL": database_url,
        "RLM_REPLICA_TIMEOUT_S": str(timeout_s),
        "RLM_MAX_CONCURRENT_RUNS": str(2 * runs_each + 4),
        "RLM_MAX_ITERATIONS": str(turns + 5),
    }
    with ExitStack() as stack:
        doomed, survivor = (
            stack.enter_context(spawn_server(_dir(work, name), model_url=server.url, **env))
            for name in ("doomed", "survivor")
        )
        time.sleep(timeout_s if settle_s is None else settle_s)

        async def scenario() -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]], float]:
            async with httpx2.AsyncClient(
                timeout=600, limits=httpx2.Limits(max_connections=4 * runs_each + 8)
            ) as client:
                ids: list[list[str]] = [[] for _ in range(runs_each)]
                started = [asyncio.Event() for _ in range(runs_each)]
                clients = [
                    asyncio.create_task(
                        _run_then_reattach(client, doomed.url, survivor.url, prompt, started[i], ids[i])
                    )
                    for i in range(runs_each)
                ]
                others = [asyncio.create_task(_run(client, survivor.url, prompt)) for _ in range(runs_each)]
                await asyncio.gather(*(event.wait() for event in started))
                followers = [asyncio.create_task(_follow(client, survivor.url, run_ids[0], 0)) for run_ids in ids]
                await asyncio.sleep(2.0)  # mid-burst: every run is in its cells
                os.kill(doomed.pid, signal.SIGKILL)
                at = time.monotonic()
                give_up = timeout_s * 3 + 2 * turns  # past it, a follower counts as not told

                async def told(task: asyncio.Task[tuple[str, float]]) -> tuple[str, float]:
                    try:
                        return await asyncio.wait_for(task, max(give_up - (time.monotonic() - at), 0))
                    except TimeoutError:
                        return "not told", time.monotonic()

                return (
                    await asyncio.gather(*map(told, followers)),
                    await asyncio.gather(*map(told, clients)),
                    await asyncio.gather(*map(told, others)),
                    at,
                )

        followed, reattached, finished, killed_at = asyncio.run(scenario())
    lost = followed + reattached
    delays = [when - killed_at for _, when in lost]
    return {
        "followers": len(lost),
        "lost": sum(code == "lost" for code, _ in lost),
        "max_s": max(delays),
        "median_s": statistics.median(delays),
        "timeout_s": timeout_s,
        "within": sum(delay <= timeout_s for delay in delays),
        "others": len(finished),
        "others_final": sum(code == "final" for code, _ in finished),
    }


def _dir(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir(exist_ok=True)
    return path
