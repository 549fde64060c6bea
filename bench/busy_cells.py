"""B13 of BENCHMARKS.md: runs beside cells that compute. Cells that keep the CPU busy (a numeric analysis, a
parser tried on a large log) compete with the server, whose one event loop streams every run's events and
starts new runs; this measures what the other runs and the health check see.

    python bench/busy_cells.py --compare NAME=DIR NAME=DIR ...   services from several source trees (e.g.
                                                                  `git worktree add` of two commits)
                                                                  alternating, one fake model server for all
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

import httpx2  # noqa: E402

from bench.benchmarks import b7_prompt, burst, script  # noqa: E402
from bench.common import FakeServer, fake_server  # noqa: E402


def spin_prompt(seconds: float) -> str:
    """A run whose one cell keeps a core busy for `seconds` of wall time, then answers."""
    return script(
        {"code": [f"import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    pass\nprint('spun')"]},
        {"code": ["answer.update(content='done', ready=True)"]},
    )


async def _spin(client: httpx2.AsyncClient, url: str, seconds: float) -> float | None:
    """One computing run: when its cell stopped computing (monotonic: its output came), None if it did not
    compute and end ready."""
    spun: float | None = None
    ready = False
    try:
        async with client.stream("POST", f"{url}/process", json={"prompt": spin_prompt(seconds)}) as response:
            async for sse in httpx2.EventSource(response):
                data = json.loads(sse.data) if sse.data else {}
                if sse.event == "output" and "spun" in data.get("stdout", "") and spun is None:
                    spun = time.monotonic()
                ready = sse.event == "final" and data.get("ready") is True
    except httpx2.HTTPError:
        return None
    return spun if ready else None


async def _health(client: httpx2.AsyncClient, url: str, stop: asyncio.Event, times: list[float]) -> int:
    """Asks `/health` every 0.2 s until `stop`, noting how long each answer took; returns how many failed."""
    failed = 0
    while not stop.is_set():
        began = time.perf_counter()
        try:
            failed += (await client.get(f"{url}/health")).status_code != 200
        except httpx2.HTTPError:
            failed += 1
        times.append(time.perf_counter() - began)
        await asyncio.sleep(0.2)
    return failed


async def _beside(url: str, *, runs: int, batch: int, spinners: int, spin_s: float) -> dict[str, Any]:
    failed: list[str] = []
    async with httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=spinners + 4)) as client:
        spinning = [asyncio.create_task(_spin(client, url, spin_s)) for _ in range(spinners)]
        await asyncio.sleep(min(3.0, spin_s / 4))  # until their cells compute
        stop, health = asyncio.Event(), list[float]()
        probe = asyncio.create_task(_health(client, url, stop, health))
        watch = (await burst(url, b7_prompt(batch), runs, batch=batch, failed=failed))[0]
        burst_ended = time.monotonic()
        stop.set()
        unhealthy = await probe
        stopped = await asyncio.gather(*spinning)
    # A cell that stopped computing before the burst ended leaves it measured partly beside idle workers.
    failures = len(failed) + unhealthy + sum(1 for when in stopped if when is None or when < burst_ended)
    return {"beside_s": watch.seconds, "health_max_s": max(health), "failures": failures}


def b13_beside_computing_cells(
    server: FakeServer, *, runs: int, batch: int, spinners: int, spin_s: float, work: Path, tree: Path = ROOT
) -> dict[str, Any]:
    """B13: `runs` runs at once (B7's run) alone, then beside `spinners` runs whose cell computes for `spin_s` s
    (started first, the burst inside their cells): the second burst's wall time against the first's, and the
    slowest `/health` answer during it. A service from the source tree `tree`."""
    import tests.conftest as conftest

    env = {"RLM_MAX_CONCURRENT_RUNS": str(runs + spinners + 4), "RLM_SUBCALL_CONCURRENCY": "16"}
    failed: list[str] = []
    own, conftest.REPO = conftest.REPO, tree  # spawn_server starts `REPO/backend/main.py`
    try:
        with conftest.spawn_server(work, model_url=server.url, **env) as srv:
            asyncio.run(burst(srv.url, b7_prompt(batch), runs, batch=batch, failed=failed))  # opens connections
            alone = asyncio.run(burst(srv.url, b7_prompt(batch), runs, batch=batch, failed=failed))[0].seconds
            beside = asyncio.run(_beside(srv.url, runs=runs, batch=batch, spinners=spinners, spin_s=spin_s))
    finally:
        conftest.REPO = own
    return {
        "alone_s": alone,
        "beside_s": beside["beside_s"],
        "ratio": beside["beside_s"] / alone,
        "health_max_ms": 1000 * beside["health_max_s"],
        "failures": len(failed) + beside["failures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", nargs="+", metavar="NAME=DIR", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = [(name, Path(path).resolve()) for name, path in (item.split("=", 1) for item in args.compare)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    with fake_server(latency=1.0, sub_latency=0.5) as server, ExitStack() as stack:
        for _ in range(args.rounds):
            for name, tree in trees:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlm-bench-")))
                result = b13_beside_computing_cells(
                    server, runs=16, batch=50, spinners=8, spin_s=12, work=work, tree=tree
                )
                results[name].append(result)
                print(f"{name}: {result['ratio']:.3f}×, slowest /health {result['health_max_ms']:.0f} ms", flush=True)
    for name, found in results.items():
        ratios = sorted(result["ratio"] for result in found)
        health = statistics.median(result["health_max_ms"] for result in found)
        failures = sum(result["failures"] for result in found)
        print(
            f"{name}: {statistics.median(ratios):.3f}× ({ratios[0]:.3f}–{ratios[-1]:.3f}), "
            f"slowest /health {health:.0f} ms (median of the bursts), failures {failures}"
        )


if __name__ == "__main__":
    main()
