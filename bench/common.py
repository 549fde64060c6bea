"""What the benchmarks share: the fake OpenAI server as its own process, the server's collector settings,
timing and statistics."""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from rlm_service.runtime import settle_heap  # noqa: E402  (the path above first)


@contextmanager
def server_heap() -> Iterator[None]:
    """The collector set as the service's process sets it (`settle_heap`), for a benchmark that runs the
    engine in this process; undone afterwards."""
    threshold = gc.get_threshold()
    settle_heap()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@dataclass
class FakeServer:
    url: str
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def fake_server(*, latency: float = 0.0, sub_latency: float | None = None) -> Iterator[FakeServer]:
    """tests/fake_openai.py in a process of its own, so that its CPU is not the client's."""
    args = [sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", "0", "--latency", str(latency)]
    if sub_latency is not None:
        args += ["--sub-latency", str(sub_latency)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield FakeServer(match.group(1), process)
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Stat:
    """Median of repeated measurements, with their spread."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def show(self, fmt: str = "{:.2f}", unit: str = "") -> str:
        med = fmt.format(self.median) + unit
        if len(self.values) < 2:
            return med
        return f"{med} ({fmt.format(self.low)}–{fmt.format(self.high)})"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
            if names:
                cpu = names[0]
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} × {cpu}, {memory:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start


class MachineBusy(threading.Thread):
    """Samples how busy the machine's cores are (all processes: /proc/stat) every 10 ms, so that a stretch of a
    benchmark can be judged CPU-bound or not."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self.running = True
        self.serial = float("nan")
        """The share of a burst's serial part (`benchmarks.burst`)."""

    def run(self) -> None:
        while self.running:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
            idle = fields[3] + fields[4]  # idle and iowait
            self.samples.append((time.time(), sum(fields) - idle, sum(fields)))
            time.sleep(0.01)

    def __enter__(self) -> MachineBusy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.running = False
        self.join()

    def share(self, start: float, end: float) -> float:
        """The share of all cores busy between two moments (Unix time), in percent."""
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (_, busy0, total0), (_, busy1, total1) = inside[0], inside[-1]
        return 100 * (busy1 - busy0) / max(total1 - total0, 1)
