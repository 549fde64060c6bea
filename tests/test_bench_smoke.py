"""Every benchmark at a tiny size, so that bench/ keeps working (the real figures: bench/run.py).

The checks are structural, so that they fail on a real regression and not on a busy machine: no call or
run failed, counts are exact where they are deterministic, and the only timing bounds are ones physics
sets (a batch cannot beat its ideal) or that only a broken feature misses by far.
"""

from __future__ import annotations

from pathlib import Path

from bench import benchmarks as b
from bench import busy_cells, fleet_bench
from bench.common import fake_server


def test_b1_batch_makes_every_call_and_cannot_beat_the_ideal() -> None:
    """Mutants caught: a failed sub-call (failures > 0); a batch that skips calls (faster than its ideal)."""
    with fake_server(sub_latency=0.01) as server:
        result = b.b1_batch(server, n=40, concurrency=8, latency=0.01)
    assert result["failures"] == result["ours_errors"] == result["sdk_errors"] == 0
    assert result["ours_ratio"] >= 1.0 and result["sdk_ratio"] >= 1.0


def test_b2_batch_runs_its_calls_at_once() -> None:
    """Eight calls of 250 ms take at least 2 s one at a time; at concurrency 8 one batch takes about 0.25 s,
    so a speed-up under 2 means the batch ran its calls (nearly) one after another. Mutant caught: the
    batch's concurrency ignored (one call at a time)."""
    with fake_server(sub_latency=0.25) as server:
        result = b.b2_speedup(server, n=8, concurrencies=(8,))
    assert result["failures"] == 0 and result["sequential_s"] >= 2.0
    assert result["speedup8"] > 2 and result["speedup8_cold"] > 2


def test_b3_every_scripted_run_ends_ready() -> None:
    """Mutant caught: runs that end without a ready `final` (then no figure is made of them)."""
    with fake_server() as server:
        result = b.b3_overhead(server, iterations=4, short=2)
    assert result["failures"] == 0
    for key in ("subprocess_tools", "inprocess_tools", "subprocess_text"):
        assert {f"{key}_ms", f"{key}_total_ms", f"{key}_fake_ms"} <= set(result)


def test_b4_every_worker_starts_and_sees_its_context() -> None:
    result = b.b4_worker_start(starts=3)
    assert result["failures"] == 0 and result["starts"] == 3 and result["median_ms"] > 0


def test_b5_upload_reaches_the_worker_whole(tmp_path: Path) -> None:
    """Mutant caught: a run that does not end with a ready `final`."""
    result = b.b5_large_upload(size=3 * 10**6, work=tmp_path)
    assert result["failures"] == 0
    assert result["first_output_s"] >= result["start_s"] > 0 and result["peak_rss_mb"] > 0


def test_b6_zero_rot() -> None:
    """Token counts are deterministic: the root sees the same prompt whatever the input's size. Mutant
    caught: a run that does not end with a ready `final`."""
    with fake_server() as server:
        result = b.b6_zero_rot(server, sizes=(1000, 2 * 10**6), iterations=2)
    assert result["failures"] == 0 and result["first_spread_pct"] < 1.0
    assert result[f"in_prompt_{2 * 10**6}"] > 100 * result[f"first_{2 * 10**6}"]


def test_b7_b8_every_concurrent_run_ends_ready(tmp_path: Path) -> None:
    """Mutant caught: a run of the burst that does not end with a ready `final` and all its replies."""
    with fake_server(sub_latency=0.01) as server:
        result = b.b7_b8_concurrent_runs(server, runs=3, batch=4, work=tmp_path)
    assert result["failures"] == 0 and result["runs"] == 9
    assert result["sse_p99_ms"] >= result["sse_p50_ms"] and result["events"] >= 3 * 14  # per warm run: 14 or more
    floor = b.b7_agent_floor(runs=2)
    assert floor["cpu_ms"] > 0 and floor["burst_s"] > 0


def test_b7_with_two_processes_every_run_ends_ready(tmp_path: Path) -> None:
    """Mutant caught: WEB_CONCURRENCY not given to the server (its second process never comes)."""
    with fake_server(sub_latency=0.01) as server:
        result = b.b7_b8_concurrent_runs(server, runs=3, batch=4, work=tmp_path, processes=2)
    assert result["failures"] == 0 and result["runs"] == 9 and result["server_cpu_ms"] > 0


def test_b11_every_run_ends_ready(tmp_path: Path) -> None:
    """Mutant caught: a run of the burst that does not end with a ready `final` and all its replies."""
    with fake_server(latency=0.05, sub_latency=0.02) as server:
        result = fleet_bench.b11_realistic(server, runs=3, batch=4, work=tmp_path, processes=2)
    assert result["failures"] == 0 and result["runs"] == 8


def test_b12_every_follower_of_the_killed_replica_hears_lost(tmp_path: Path, pg_url: str) -> None:
    """Mutant caught: no sweeper (the followers of the killed replica's runs wait until the benchmark gives up
    on them). How many heard it within the 3 s of RLM_REPLICA_TIMEOUT_S is the benchmark's figure, not asserted
    here: on a machine busy with other suites the sweep came later (3 of 4 in time, once)."""
    with fake_server(latency=0.05, sub_latency=0.02) as server:
        result = fleet_bench.b12_failover(
            server, database_url=pg_url, runs_each=2, timeout_s=3, turns=12, work=tmp_path
        )
    assert result["followers"] == 4 and result["lost"] == 4
    assert result["others"] == result["others_final"] == 2


def test_b13_measures_beside_cells_that_are_computing(tmp_path: Path) -> None:
    """Mutant caught: computing runs whose cell does not compute (it prints and ends at once), so that the
    burst's runs had nothing beside them."""
    with fake_server(latency=0.05, sub_latency=0.02) as server:
        result = busy_cells.b13_beside_computing_cells(server, runs=2, batch=4, spinners=2, spin_s=10, work=tmp_path)
    assert result["failures"] == 0 and result["health_max_ms"] > 0
