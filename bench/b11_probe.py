"""Where B11's time goes: one warm burst of 64 B7 runs (root 1 s per turn, sub-calls 500 ms), with each event's
time after its request (median and slowest over the runs, against a run alone) and the CPU of each process
class in windows of the burst (/proc/<pid>/stat, sampled every 50 ms): the server processes, the zygote, the
REPL workers (ended ones included), the fake model server, this client, and the rest of the machine.

    python bench/b11_probe.py [--processes N]                  phases and CPU of the tree this file is in
    python bench/b11_probe.py --compare NAME=DIR NAME=DIR ...  bursts alternating between services run from
                                                               several source trees (e.g. `git worktree add`
                                                               of two commits), one fake server for all
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

import httpx2  # noqa: E402
import tests.conftest as conftest  # noqa: E402

from bench.benchmarks import b7_prompt, burst, service_cpu, wait_for_processes  # noqa: E402
from bench.common import fake_server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
CLASSES = ["server", "zygote", "workers", "fake", "client"]


def _stat(pid: str) -> tuple[str, int, float, float] | None:
    """Name, parent, own CPU seconds and reaped children's CPU seconds of a process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    name = text[text.index("(") + 1 : text.rindex(")")]
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


class Sampler(threading.Thread):
    """CPU seconds so far by process class, every 50 ms. A worker is counted as the zygote until it renames
    itself, and the workers' time reliably only once the zygote has reaped them (the end of the burst): over
    windows read zygote + workers + other together; the burst's total is exact."""

    def __init__(self, server: int, fake: int) -> None:
        super().__init__(daemon=True)
        self.server, self.fake = server, fake
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.running = True

    def sample(self) -> dict[str, float]:
        out = dict.fromkeys(CLASSES, 0.0)
        for entry in os.listdir("/proc"):
            found = _stat(entry) if entry.isdigit() else None
            if found is None:
                continue
            name, parent, own, children = found
            pid = int(entry)
            if pid == self.fake:
                out["fake"] += own
            elif pid == os.getpid():
                out["client"] += own
            elif pid == self.server or (parent == self.server and name.startswith("python")):
                out["server"] += own
            elif name == "rlm-zygote":
                out["zygote"] += own
                out["workers"] += children  # the workers it has reaped
            elif name == "rlm-worker":
                out["workers"] += own
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        out["machine"] = (sum(fields) - fields[3] - fields[4]) / TICK
        return out

    def run(self) -> None:
        while self.running:
            self.samples.append((time.time(), self.sample()))
            time.sleep(0.05)

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores used by each class between two moments (Unix time)."""
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        return {key: (last[key] - first[key]) / (t1 - t0) for key in last}


async def _one(client: httpx2.AsyncClient, url: str, prompt: str) -> list[tuple[str, float]]:
    """One run's events: type, and (server) time after the request was sent."""
    sent = time.time()
    events = []
    async with client.stream("POST", f"{url}/process", json={"prompt": prompt, "input_data": "x"}) as response:
        async for sse in httpx2.EventSource(response):
            if sse.data:
                events.append((sse.event, json.loads(sse.data)["ts"] - sent))
    return events


async def _burst(url: str, prompt: str, count: int) -> tuple[float, list[list[tuple[str, float]]]]:
    async with httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=count + 4)) as client:
        began = time.perf_counter()
        runs = await asyncio.gather(*(_one(client, url, prompt) for _ in range(count)))
        return time.perf_counter() - began, list(runs)


def phases(processes: int, runs: int, work: Path) -> None:
    prompt = b7_prompt(50)
    env = {"RLM_MAX_CONCURRENT_RUNS": str(runs + 4), "RLM_SUBCALL_CONCURRENCY": "16", "WEB_CONCURRENCY": str(processes)}
    with (
        fake_server(latency=1.0, sub_latency=0.5) as fake,
        conftest.spawn_server(work, model_url=fake.url, **env) as srv,
    ):
        wait_for_processes(srv.process.pid, processes)
        sampler = Sampler(srv.process.pid, fake.pid)
        sampler.start()
        alone_s, alone = asyncio.run(_burst(srv.url, prompt, 1))
        asyncio.run(_burst(srv.url, prompt, runs))  # opens the model connections
        time.sleep(1)
        began = time.time()
        together_s, together = asyncio.run(_burst(srv.url, prompt, runs))
        ended = time.time()
        time.sleep(0.2)
        sampler.running = False
        sampler.join()
    print(f"alone {alone_s:.3f} s, {runs} together {together_s:.3f} s: {together_s / alone_s:.3f}×")
    print(f"{'event':10} {'alone':>7} {'median':>7} {'slowest':>7}   (seconds after the request)")
    for index in range(min(len(events) for events in together)):
        name = "/".join(sorted({events[index][0] for events in together}))
        times = [events[index][1] for events in together]
        print(f"{name:10} {alone[0][index][1]:7.3f} {statistics.median(times):7.3f} {max(times):7.3f}")
    print("cores used, by window of the burst (seconds after its start); other: the rest of the machine")
    print(f"{'window':>11} " + " ".join(f"{key:>7}" for key in CLASSES) + "   other")
    cuts = [0.0, 0.3, 1.2, 1.5, 2.5, 3.5, 4.5, together_s]
    for low, high in itertools.pairwise(cuts):
        cores = sampler.cores(began + low, began + high)
        if cores:
            other = cores["machine"] - sum(cores[key] for key in CLASSES)
            print(f"{low:4.2f}–{high:4.2f}  " + " ".join(f"{cores[key]:7.2f}" for key in CLASSES) + f" {other:7.2f}")
    cores = sampler.cores(began, ended)
    print("CPU seconds in the burst: " + ", ".join(f"{key} {cores[key] * (ended - began):.2f}" for key in CLASSES))


def compare(
    trees: list[tuple[str, Path]], processes: int, runs: int, rounds: int, latency: tuple[float, float] = (1.0, 0.5)
) -> None:
    prompt = b7_prompt(50)
    env = {"RLM_MAX_CONCURRENT_RUNS": str(runs + 4), "RLM_SUBCALL_CONCURRENCY": "16", "WEB_CONCURRENCY": str(processes)}
    failed: list[str] = []
    results: dict[str, dict[str, list[float]]] = {name: {"alone": [], "burst": [], "cpu": []} for name, _ in trees}
    with fake_server(latency=latency[0], sub_latency=latency[1]) as fake, ExitStack() as stack:
        servers: dict[str, Any] = {}
        for name, tree in trees:
            conftest.REPO = tree  # spawn_server starts `REPO/backend/main.py`
            work = Path(conftest.private_tempdir())
            servers[name] = stack.enter_context(conftest.spawn_server(work, model_url=fake.url, **env))
            wait_for_processes(servers[name].process.pid, processes)
        for srv in servers.values():
            asyncio.run(burst(srv.url, prompt, runs, batch=50, failed=failed))  # opens the model connections
        for _ in range(rounds):
            for name, srv in servers.items():
                results[name]["alone"].append(
                    asyncio.run(burst(srv.url, prompt, 1, batch=50, failed=failed))[0].seconds
                )
                before = service_cpu(srv.process.pid)[0]
                watch = asyncio.run(burst(srv.url, prompt, runs, batch=50, failed=failed))[0]
                results[name]["burst"].append(watch.seconds)
                results[name]["cpu"].append(1000 * (service_cpu(srv.process.pid)[0] - before) / runs)
                print(f"{name}: {watch.seconds / results[name]['alone'][-1]:.3f}×", flush=True)
    print(f"failed runs: {len(failed)}")
    for name, result in results.items():
        alone = statistics.median(result["alone"])
        ratios = sorted(seconds / alone for seconds in result["burst"])
        print(
            f"{name}: {statistics.median(ratios):.3f}× ({ratios[0]:.3f}–{ratios[-1]:.3f}), alone {alone:.2f} s, "
            f"server CPU per run {statistics.median(result['cpu']):.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="WEB_CONCURRENCY")
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="bursts per tree (--compare)")
    parser.add_argument("--compare", nargs="+", metavar="NAME=DIR")
    parser.add_argument(
        "--latency",
        nargs=2,
        type=float,
        default=(1.0, 0.5),
        metavar=("ROOT_S", "SUB_S"),
        help="the fake model's latencies (--compare; B7's: 0 0.2)",
    )
    args = parser.parse_args()
    if args.compare:
        trees = [(name, Path(tree).resolve()) for name, tree in (item.split("=", 1) for item in args.compare)]
        compare(trees, args.processes, args.runs, args.rounds, tuple(args.latency))
    else:
        phases(args.processes, args.runs, Path(conftest.private_tempdir()))


if __name__ == "__main__":
    main()
