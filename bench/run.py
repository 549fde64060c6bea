"""Run the benchmarks and rewrite the results table in BENCHMARKS.md.

    python bench/run.py            # all of them, a few minutes
    python bench/run.py B1 B3      # some of them (the table keeps the other rows)

The machine is shared and noisy: each figure is the median of several repetitions with the spread
(min–max) beside it, and comparisons are ratios measured side by side in the same run. For the
reference library (rlms), set up its virtualenv once:
`python3 -m venv bench/.venv-rlms && bench/.venv-rlms/bin/pip install -r bench/requirements-rlms.txt`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchmarks as b
from bench.common import ROOT, Stat, fake_server, machine

RESULTS = ROOT / "bench" / "results"
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"


def repeat(times: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Stat]:
    runs = [measure() for _ in range(times)]
    keys = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    return {key: Stat([float(run[key]) for run in runs if run.get(key) is not None]) for key in keys}


def row(number: str, what: str, measured: str, target: str, met: bool | None) -> dict[str, str]:
    verdict = "—" if met is None else ("yes" if met else "**no**")
    return {"n": number, "what": what, "measured": measured, "target": target, "met": verdict,
            "command": f"`python bench/run.py {number}`"}


def bench_b1() -> list[dict[str, str]]:
    with fake_server(sub_latency=0.1) as server:
        s = repeat(3, lambda: b.b1_batch(server, n=2000, concurrency=64, latency=0.1))
    rows = [row("B1", "`llm_batch` of 2,000 prompts, 100 ms latency, concurrency 64: wall ÷ ideal (3.125 s)",
                s["ours_ratio"].show(unit="×"), "≤ 1.2×", s["ours_ratio"].median <= 1.2),
            row("B1", "… client CPU per call (server and worker)", s["ours_cpu_ms_per_call"].show(unit=" ms"),
                "—", None),
            row("B1", "… same calls through the `openai` SDK instead: wall ÷ ideal; CPU per call",
                f"{s['sdk_ratio'].show(unit='×')}; {s['sdk_cpu_ms_per_call'].show(unit=' ms')}", "—", None)]
    if "rlms_ratio" in s:
        faster = s["ours_ratio"].median < s["rlms_ratio"].median
        rows.append(row("B1", "… rlms' `llm_query_batched`, same concurrency: wall ÷ ideal; CPU per call",
                        f"{s['rlms_ratio'].show(unit='×')}; {s['rlms_cpu_ms_per_call'].show(unit=' ms')}",
                        "ours faster", faster))
    return rows


def bench_b2() -> list[dict[str, str]]:
    with fake_server(sub_latency=0.25) as server:
        s = repeat(3, lambda: b.b2_speedup(server, n=64, concurrencies=(16, 64)))
    rows = [row("B2", f"64 sub-calls at 250 ms: speed-up of `llm_batch` at concurrency {c} over one at a time "
                      "(connection pool warm, as in a running server)",
                s[f"speedup{c}"].show(unit="×"), f"≥ {0.9 * c:g}×", s[f"speedup{c}"].median >= 0.9 * c)
            for c in (16, 64)]
    rows += [row("B2", f"… the same with a cold pool (first batch of a fresh process), concurrency {c}",
                 s[f"speedup{c}_cold"].show(unit="×"), "—", None) for c in (16, 64)]
    return rows


def bench_b3() -> list[dict[str, str]]:
    with fake_server(latency=0.0, sub_latency=0.0) as server:
        s = repeat(5, lambda: b.b3_overhead(server, iterations=20))
    rows = []
    rlms = s.get("rlms_ms")
    for key, label in (("subprocess_tools", "`subprocess` REPL, tools protocol"),
                       ("inprocess_tools", "`inprocess` REPL, tools protocol"),
                       ("subprocess_text", "`subprocess` REPL, text protocol")):
        marginal, total = s[f"{key}_ms"], s[f"{key}_total_ms"]
        met = marginal.median < 10 and (rlms is None or total.median <= s["rlms_total_ms"].median)
        rows.append(row("B3", f"controller overhead per iteration, model time excluded, {label}: steady state "
                              "(median gap between iterations); whole 20-iteration run ÷ 20",
                        f"{marginal.show(unit=' ms')}; {total.show(unit=' ms')}", "< 10 ms; ≤ rlms", met))
    rows.append(row("B3", "… the fake model server's own time per root request (subtracted above)",
                    s["subprocess_tools_fake_ms"].show(unit=" ms"), "—", None))
    if rlms:
        rows.append(row("B3", "… rlms on the same script (its local REPL): steady state (slope, 20 vs 5 "
                              "iterations); whole run ÷ iterations",
                        f"{rlms.show(unit=' ms')}; {s['rlms_total_ms'].show(unit=' ms')}", "—", None))
    return rows


def bench_b4() -> list[dict[str, str]]:
    s = repeat(1, lambda: b.b4_worker_start(starts=30))
    return [row("B4", "worker start per run (`subprocess`): spawn → sandboxed → `context` loaded; median, p90",
                f"{s['median_ms'].show('{:.0f}', ' ms')}, p90 {s['p90_ms'].show('{:.0f}', ' ms')}", "< 150 ms",
                s["median_ms"].median < 150)]


def bench_b5() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        s = repeat(1, lambda: b.b5_large_upload(size=10**9, work=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row("B5", "1 GB multipart upload: throughput on loopback", s["throughput_mb_s"].show("{:.0f}", " MB/s"),
            "≥ 200 MB/s", s["throughput_mb_s"].median >= 200),
        row("B5", "… time to the `start` event; to the output of `len(context)`",
            f"{s['start_s'].show(unit=' s')}; {s['first_output_s'].show(unit=' s')}", "—", None),
        row("B5", "… peak RSS of server and worker together", s["peak_rss_mb"].show("{:.0f}", " MB"),
            f"≤ {s['rss_budget_mb'].median:.0f} MB (1.5 × input + 300 MB)",
            s["peak_rss_mb"].median <= s["rss_budget_mb"].median),
    ]


def bench_b6() -> list[dict[str, str]]:
    sizes = (1000, 100 * 10**6, 10**9)
    with fake_server() as server:
        result = b.b6_zero_rot(server, sizes=sizes, iterations=5)
    cells = "; ".join(f"{label}: {result[size]['first']:,} / {result[size]['total']:,} "
                      f"(in the prompt: {result[size]['in_prompt']:,})"
                      for size, label in zip(sizes, ("1 KB", "100 MB", "1 GB"), strict=True))
    spread = max(result["first_spread_pct"], result["total_spread_pct"])
    return [row("B6", "zero-rot: root input tokens at iteration 1 / over 5 iterations, by input size", cells,
                "equal within 1%", spread <= 1.0),
            row("B6", "… largest difference across sizes", f"{spread:.2f}%", "≤ 1%", spread <= 1.0)]


def bench_b7() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        with fake_server(sub_latency=0.2) as server:
            s = repeat(3, lambda: b.b7_b8_concurrent_runs(server, runs=32, batch=50, work=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = repeat(5, lambda: b.b7_agent_floor(runs=32))
    cpu = "; ".join(s[f"{part}_cpu_ms"].show("{:.0f}") for part in ("server", "workers", "model", "client"))
    return [
        row("B7", "32 concurrent runs (3 iterations, `llm_batch` of 50 at 200 ms each): total wall ÷ one run's "
                  "(connection pool warm, as in a running server)",
            f"{s['ratio'].show(unit='×')} ({s['together_s'].show(unit=' s')} vs {s['single_s'].show(unit=' s')})",
            "≤ 1.5×", s["ratio"].median <= 1.5),
        row("B7", "… the first burst of a fresh server (it opens 512 connections to the model server)",
            f"{s['cold_ratio'].show(unit='×')} ({s['cold_s'].show(unit=' s')})", "—", None),
        row("B7", "… when the last of the 32 batches started, after the burst began (one run alone: its batch "
                  "started after)", f"{s['last_batch_start_s'].show(unit=' s')} "
                                  f"({s['single_batch_start_s'].show('{:.3f}', ' s')})", "—", None),
        row("B7", "… CPU per run during the warm burst, in ms: the server process; its REPL workers and zygote; "
                  "the fake model server; the benchmark's client. Share of both cores busy with them",
            f"{cpu}. {s['machine_busy_pct'].show('{:.0f}', '%')}", "—", None),
        row("B7", "… PydanticAI's agent graph alone for the same 3 turns (`FunctionModel`: no HTTP, no REPL): "
                  "CPU per run; for 32 runs, all on the one event loop",
            f"{floor['cpu_ms'].show('{:.1f}', ' ms')}; {floor['burst_s'].show(unit=' s')}", "—", None),
        row("B8", "SSE delivery, event created → received by the client, during B7 (warm): p50; p99",
            f"{s['sse_p50_ms'].show('{:.1f}', ' ms')}; {s['sse_p99_ms'].show('{:.1f}', ' ms')}", "p99 < 50 ms",
            s["sse_p99_ms"].median < 50),
        row("B8", "… during the first burst: p50; p99",
            f"{s['cold_sse_p50_ms'].show('{:.1f}', ' ms')}; {s['cold_sse_p99_ms'].show('{:.1f}', ' ms')}", "—", None),
    ]


BENCHMARKS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "B1": bench_b1, "B2": bench_b2, "B3": bench_b3, "B4": bench_b4, "B5": bench_b5, "B6": bench_b6,
    "B7": bench_b7,
}


def render(rows: list[dict[str, str]]) -> str:
    lines = ["| # | what | measured: median (min–max) | target | met | command |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['n']} | {r['what']} | {r['measured']} | {r['target']} | {r['met']} | {r['command']} |"
              for r in rows]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{TABLE_START}\nMeasured {stamp} on {machine()}.\n\n" + "\n".join(lines) + f"\n{TABLE_END}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", default=list(BENCHMARKS), help="B1 … B7 (B8 comes with B7)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "rows.json"
    rows_by_bench: dict[str, list[dict[str, str]]] = json.loads(saved.read_text()) if saved.exists() else {}
    for name in args.which:
        name = name.upper().replace("B8", "B7")
        print(f"--- {name}", flush=True)
        rows_by_bench[name] = BENCHMARKS[name]()
        for r in rows_by_bench[name]:
            print(f"{r['n']}: {r['what']}: {r['measured']} (target {r['target']}, met: {r['met']})", flush=True)
        saved.write_text(json.dumps(rows_by_bench, indent=1))
    rows = [r for key in BENCHMARKS if key in rows_by_bench for r in rows_by_bench[key]]
    document = ROOT / "BENCHMARKS.md"
    text = document.read_text()
    table = render(rows)
    text = re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: table, text, flags=re.S)
    document.write_text(text)
    print(f"wrote {document}")


if __name__ == "__main__":
    main()
