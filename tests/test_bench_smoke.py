"""Every benchmark at a tiny size, so that bench/ keeps working (the real figures: bench/run.py)."""

from __future__ import annotations

from pathlib import Path

from bench import benchmarks as b
from bench.common import fake_server


def test_b1_b2_batches() -> None:
    with fake_server(sub_latency=0.01) as server:
        result = b.b1_batch(server, n=40, concurrency=8, latency=0.01)
        assert result["ours_errors"] == 0 and result["ours_ratio"] > 0.5 and result["sdk_ratio"] > 0.5
        speedup = b.b2_speedup(server, n=16, concurrencies=(4,))
        assert speedup["speedup4"] > 1.5


def test_b3_overhead() -> None:
    with fake_server() as server:
        result = b.b3_overhead(server, iterations=4, short=2)
    for key in ("subprocess_tools", "inprocess_tools", "subprocess_text"):
        assert result[f"{key}_total_ms"] > 0 and f"{key}_ms" in result


def test_b4_worker_start() -> None:
    result = b.b4_worker_start(starts=3)
    assert 0 < result["median_ms"] < 5000


def test_b5_upload(tmp_path: Path) -> None:
    result = b.b5_large_upload(size=3 * 10**6, work=tmp_path)
    assert result["throughput_mb_s"] > 0 and result["first_output_s"] >= result["start_s"] > 0
    assert result["peak_rss_mb"] > 0


def test_b6_zero_rot() -> None:
    with fake_server() as server:
        result = b.b6_zero_rot(server, sizes=(1000, 2 * 10**6), iterations=2)
    assert result["first_spread_pct"] < 1.0 and result[2 * 10**6]["in_prompt"] > 100 * result[2 * 10**6]["first"]


def test_b7_b8_concurrent(tmp_path: Path) -> None:
    with fake_server(sub_latency=0.01) as server:
        result = b.b7_b8_concurrent_runs(server, runs=3, batch=4, work=tmp_path)
    assert result["ratio"] > 0 and result["cold_ratio"] > 0 and result["events"] > 10
    assert result["sse_p99_ms"] >= result["sse_p50_ms"] >= 0 and result["cold_sse_p99_ms"] >= 0
    assert result["together_s"] > result["last_batch_start_s"] > 0 and result["single_batch_start_s"] > 0
    assert result["server_cpu_ms"] > 0 and result["workers_cpu_ms"] >= 0 and result["machine_busy_pct"] > 0
    floor = b.b7_agent_floor(runs=2)
    assert floor["cpu_ms"] > 0 and floor["burst_s"] > 0
