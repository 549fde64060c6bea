"""Run the benchmarks and rewrite their rows in BENCHMARKS.md.

    python bench/run.py            # all of them, a few minutes
    python bench/run.py B1 B3      # some of them: their rows are rewritten, the others kept as they are

The rows live in BENCHMARKS.md itself, each stamped with the day and the commit it was measured at.
The machine is shared and noisy: each figure is the median of at least three repetitions with the spread
(min–max) beside it, and comparisons are ratios measured side by side in the same run. A benchmark whose
runs failed (a failed call, a run without a ready `final`, a worker that did not start) gets the verdict
"failed", whatever its figures. For the reference library (rlms), set up its virtualenv once:
`python3 -m venv bench/.venv-rlms && bench/.venv-rlms/bin/pip install -r bench/requirements-rlms.txt`.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchmarks as b
from bench import busy_cells, fleet_bench
from bench import resources as r
from bench.common import ROOT, Stat, fake_server, machine

DOCUMENT = ROOT / "BENCHMARKS.md"
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"
REPEATS = 3
COLUMNS = ("n", "what", "measured", "target", "met", "when", "command")
HEADER = [
    "| # | what | measured: median (min–max) | target | met | measured on (commit) | command |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]
MACHINE_LINE = "Machine of the last run: "


@dataclass
class Measured:
    """The figures of repeated runs, and how many of their calls or runs failed."""

    stats: dict[str, Stat]
    failures: int

    def __getitem__(self, key: str) -> Stat:
        return self.stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self.stats

    def get(self, key: str) -> Stat | None:
        return self.stats.get(key)


def repeat(times: int, measure: Callable[[], dict[str, Any]]) -> Measured:
    runs = [measure() for _ in range(times)]
    keys = dict.fromkeys(
        key for run in runs for key, value in run.items() if isinstance(value, (int, float)) and key != "failures"
    )
    stats = {key: Stat([float(run[key]) for run in runs if run.get(key) is not None]) for key in keys}
    return Measured(stats, sum(int(run.get("failures", 0)) for run in runs))


def stamp() -> str:
    """Today and the commit measured; `+changes` when backend/, bench/ or tests/ differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    dirty = git("diff", "--quiet", "HEAD", "--", "backend", "bench", "tests").returncode != 0
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    return f"{today} (`{commit}`{'+changes' if dirty else ''})"


def row(number: str, what: str, measured: str, target: str, met: bool | None, failures: int = 0) -> dict[str, str]:
    if failures:
        verdict = f"**failed** ({failures} failed)"
    else:
        verdict = "—" if met is None else ("yes" if met else "**no**")
    return {
        "n": number,
        "what": what,
        "measured": measured,
        "target": target,
        "met": verdict,
        "when": "",
        "command": f"`python bench/run.py {number}`",
    }


def bench_b1() -> list[dict[str, str]]:
    with fake_server(sub_latency=0.1) as server:
        s = repeat(REPEATS, lambda: b.b1_batch(server, n=2000, concurrency=64, latency=0.1))
    failed = s.failures
    rows = [
        row(
            "B1",
            "`llm_batch` of 2,000 prompts, 100 ms latency, concurrency 64: wall ÷ ideal (3.125 s)",
            s["ours_ratio"].show(unit="×"),
            "≤ 1.2×",
            s["ours_ratio"].median <= 1.2,
            failed,
        ),
        row(
            "B1",
            "… failed calls over the repetitions: ours; through the `openai` SDK; rlms",
            "; ".join(
                f"{s[k].show('{:.0f}')}" if k in s else "—" for k in ("ours_errors", "sdk_errors", "rlms_errors")
            ),
            "0",
            failed == 0,
            failed,
        ),
        row("B1", "… client CPU per call (server and worker)", s["ours_cpu_ms_per_call"].show(unit=" ms"), "—", None),
        row(
            "B1",
            "… same calls through the `openai` SDK instead: wall ÷ ideal; CPU per call",
            f"{s['sdk_ratio'].show(unit='×')}; {s['sdk_cpu_ms_per_call'].show(unit=' ms')}",
            "—",
            None,
        ),
    ]
    if "rlms_ratio" in s:
        faster = s["ours_ratio"].median < s["rlms_ratio"].median
        rows.append(
            row(
                "B1",
                "… rlms' `llm_query_batched`, same concurrency: wall ÷ ideal; CPU per call",
                f"{s['rlms_ratio'].show(unit='×')}; {s['rlms_cpu_ms_per_call'].show(unit=' ms')}",
                "ours faster",
                faster,
                failed,
            )
        )
    return rows


def bench_b2() -> list[dict[str, str]]:
    with fake_server(sub_latency=0.25) as server:
        s = repeat(REPEATS, lambda: b.b2_speedup(server, n=64, concurrencies=(16, 64)))
    rows = [
        row(
            "B2",
            f"64 sub-calls at 250 ms: speed-up of `llm_batch` at concurrency {c} over one at a time "
            "(connection pool warm, as in a running server)",
            s[f"speedup{c}"].show(unit="×"),
            f"≥ {0.9 * c:g}×",
            s[f"speedup{c}"].median >= 0.9 * c,
            s.failures,
        )
        for c in (16, 64)
    ]
    rows += [
        row(
            "B2",
            f"… the same with a cold pool (first batch of a fresh process), concurrency {c}",
            s[f"speedup{c}_cold"].show(unit="×"),
            "—",
            None,
        )
        for c in (16, 64)
    ]
    return rows


def bench_b3() -> list[dict[str, str]]:
    with fake_server(latency=0.0, sub_latency=0.0) as server:
        s = repeat(5, lambda: b.b3_overhead(server, iterations=20))
    rows = []
    for key, label in (
        ("subprocess_tools", "`subprocess` REPL, tools protocol"),
        ("inprocess_tools", "`inprocess` REPL, tools protocol"),
        ("subprocess_text", "`subprocess` REPL, text protocol"),
    ):
        marginal, total = s[f"{key}_ms"], s[f"{key}_total_ms"]
        rows.append(
            row(
                "B3",
                f"controller overhead per iteration, model time excluded, {label}: steady state "
                "(median gap between iterations); whole 20-iteration run ÷ 20",
                f"{marginal.show(unit=' ms')}; {total.show(unit=' ms')}",
                "< 10 ms (steady state)",
                marginal.median < 10,
                s.failures,
            )
        )
    rows.append(
        row(
            "B3",
            "… the fake model server's own time per root request (subtracted above)",
            s["subprocess_tools_fake_ms"].show(unit=" ms"),
            "—",
            None,
        )
    )
    rlms, rlms_total = s.get("rlms_ms"), s.get("rlms_total_ms")
    if rlms is not None and rlms_total is not None:
        ours, ours_total = s["subprocess_tools_ms"], s["subprocess_tools_total_ms"]
        rows += [
            row(
                "B3",
                "… steady state, ours (`subprocess`, tools) vs rlms on the same script (its local REPL; "
                "the slope between a 20- and a 5-iteration run)",
                f"{ours.show(unit=' ms')} vs {rlms.show(unit=' ms')}",
                "≤ rlms",
                ours.median <= rlms.median,
                s.failures,
            ),
            row(
                "B3",
                "… whole run ÷ iterations, ours (`subprocess`, tools) vs rlms (its per-run setup included)",
                f"{ours_total.show(unit=' ms')} vs {rlms_total.show(unit=' ms')}",
                "≤ rlms",
                ours_total.median <= rlms_total.median,
                s.failures,
            ),
        ]
    return rows


def bench_b4() -> list[dict[str, str]]:
    s = repeat(REPEATS, lambda: b.b4_worker_start(starts=30))
    return [
        row(
            "B4",
            "worker start per run (`subprocess`): spawn → sandboxed → `context` loaded; median, p90 of 30 starts",
            f"{s['median_ms'].show('{:.1f}', ' ms')}, p90 {s['p90_ms'].show('{:.1f}', ' ms')}",
            "< 150 ms",
            s["median_ms"].median < 150,
            s.failures,
        )
    ]


def bench_b5() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        s = repeat(REPEATS, lambda: b.b5_large_upload(size=10**9, work=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row(
            "B5",
            "1 GB multipart upload: throughput on loopback",
            s["throughput_mb_s"].show("{:.0f}", " MB/s"),
            "≥ 200 MB/s",
            s["throughput_mb_s"].median >= 200,
            s.failures,
        ),
        row(
            "B5",
            "… time to the `start` event; to the output of `len(context)`",
            f"{s['start_s'].show(unit=' s')}; {s['first_output_s'].show(unit=' s')}",
            "—",
            None,
        ),
        row(
            "B5",
            "… peak RSS of server and worker together",
            s["peak_rss_mb"].show("{:.0f}", " MB"),
            f"≤ {s['rss_budget_mb'].median:.0f} MB (1.5 × input + 300 MB)",
            s["peak_rss_mb"].median <= s["rss_budget_mb"].median,
            s.failures,
        ),
    ]


def bench_b6() -> list[dict[str, str]]:
    sizes = (1000, 100 * 10**6, 10**9)
    with fake_server() as server:
        s = repeat(REPEATS, lambda: b.b6_zero_rot(server, sizes=sizes, iterations=5))
    cells = "; ".join(
        f"{label}: {s[f'first_{size}'].median:,.0f} / {s[f'total_{size}'].median:,.0f} "
        f"(in the prompt: {s[f'in_prompt_{size}'].median:,.0f})"
        for size, label in zip(sizes, ("1 KB", "100 MB", "1 GB"), strict=True)
    )
    spread = max(s["first_spread_pct"].median, s["total_spread_pct"].median)
    return [
        row(
            "B6",
            "zero-rot: root input tokens at iteration 1 / over 5 iterations, by input size",
            cells,
            "equal within 1%",
            spread <= 1.0,
            s.failures,
        ),
        row("B6", "… largest difference across sizes", f"{spread:.2f}%", "≤ 1%", spread <= 1.0, s.failures),
        *b6_sessions_rows(),
        row(
            "B6",
            "… the system prompt the root reads every turn (tools protocol, default limits): characters; "
            "tokens as the fake server counts them (characters ÷ 4)",
            f"{len(_system_prompt()):,}; {len(_system_prompt()) // 4:,}",
            "—",
            None,
        ),
    ]


def _system_prompt() -> str:
    from rlm_service import prompts
    from rlm_service.engine import effective_limits

    return prompts.system_prompt("tools", effective_limits(b.settings_for("http://127.0.0.1:9/v1"), None))


def bench_b7() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        with fake_server(sub_latency=0.2) as server:
            s = repeat(REPEATS, lambda: b.b7_b8_concurrent_runs(server, runs=32, batch=50, work=work))
            two = repeat(REPEATS, lambda: b.b7_b8_concurrent_runs(server, runs=32, batch=50, work=work, processes=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = repeat(5, lambda: b.b7_agent_floor(runs=32))
    cpu = "; ".join(s[f"{part}_cpu_ms"].show("{:.0f}") for part in ("server", "workers", "model", "client"))
    failed = s.failures
    return [
        row(
            "B7",
            "32 concurrent runs (3 iterations, `llm_batch` of 50 at 200 ms each): total wall ÷ one run's "
            "(connection pool warm, as in a running server)",
            f"{s['ratio'].show(unit='×')} ({s['together_s'].show(unit=' s')} vs {s['single_s'].show(unit=' s')})",
            "≤ 1.5×",
            s["ratio"].median <= 1.5,
            failed,
        ),
        row(
            "B7",
            f"… runs that did not end with a ready `final` and all 50 replies, of {s['runs'].median * REPEATS:.0f}",
            str(failed),
            "0",
            failed == 0,
            failed,
        ),
        row(
            "B7",
            "… the first burst of a fresh server (it opens 512 connections to the model server)",
            f"{s['cold_ratio'].show(unit='×')} ({s['cold_s'].show(unit=' s')})",
            "—",
            None,
        ),
        row(
            "B7",
            "… when the last of the 32 batches started, after the burst began (one run alone: its batch started after)",
            f"{s['last_batch_start_s'].show(unit=' s')} ({s['single_batch_start_s'].show('{:.3f}', ' s')})",
            "—",
            None,
        ),
        row(
            "B7",
            "… CPU per run during the warm burst, in ms: the server process; its REPL workers and zygote; "
            "the fake model server; the benchmark's client. Share of both cores busy with them; share of "
            "both cores busy (all processes) until the last batch started",
            f"{cpu}. {s['machine_busy_pct'].show('{:.0f}', '%')}; {s['serial_busy_pct'].show('{:.0f}', '%')}",
            "—",
            None,
        ),
        row(
            "B7",
            "… PydanticAI's agent graph alone for the same 3 turns (`FunctionModel`: no HTTP, no REPL): "
            "CPU per run; for 32 runs, all on the one event loop",
            f"{floor['cpu_ms'].show('{:.1f}', ' ms')}; {floor['burst_s'].show(unit=' s')}",
            "—",
            None,
        ),
        row(
            "B7",
            "… the same burst served by two processes (`WEB_CONCURRENCY=2`, one SQLite history): total wall "
            "÷ one run's",
            f"{two['ratio'].show(unit='×')} ({two['together_s'].show(unit=' s')} vs {two['single_s'].show(unit=' s')})",
            "≤ 1.5×",
            two["ratio"].median <= 1.5,
            two.failures,
        ),
        row(
            "B7",
            "… with two processes: when the last batch started; CPU per run during the warm burst, in ms: "
            "the server processes (and their supervisor), their REPL workers and zygotes; share of both "
            "cores busy over the burst, and until the last batch started",
            f"{two['last_batch_start_s'].show(unit=' s')}; {two['server_cpu_ms'].show('{:.0f}')}, "
            f"{two['workers_cpu_ms'].show('{:.0f}')}; {two['machine_busy_pct'].show('{:.0f}', '%')}, "
            f"{two['serial_busy_pct'].show('{:.0f}', '%')}",
            "—",
            None,
        ),
        row(
            "B8",
            "SSE delivery, event created → received by the client, during B7 (warm): p50; p99",
            f"{s['sse_p50_ms'].show('{:.1f}', ' ms')}; {s['sse_p99_ms'].show('{:.1f}', ' ms')}",
            "p99 < 50 ms",
            s["sse_p99_ms"].median < 50,
            failed,
        ),
        row(
            "B8",
            "… during the first burst: p50; p99",
            f"{s['cold_sse_p50_ms'].show('{:.1f}', ' ms')}; {s['cold_sse_p99_ms'].show('{:.1f}', ' ms')}",
            "—",
            None,
        ),
    ]


def bench_b11() -> list[dict[str, str]]:
    work = b.temp_dir()
    rows = []
    try:
        with fake_server(latency=1.0, sub_latency=0.5) as server:
            for processes, label in ((1, "one process"), (2, "two processes (`WEB_CONCURRENCY=2`)")):
                s = repeat(
                    REPEATS,
                    lambda processes=processes: fleet_bench.b11_realistic(  # type: ignore[misc]
                        server, runs=64, batch=50, work=work, processes=processes
                    ),
                )
                rows.append(
                    row(
                        "B11",
                        f"64 concurrent runs at realistic latencies (root 1 s per turn, sub-calls "
                        f"500 ms; B7's run), {label}: total wall ÷ one run's; server CPU per run",
                        f"{s['ratio'].show(unit='×')} ({s['together_s'].show(unit=' s')} vs "
                        f"{s['single_s'].show(unit=' s')}); {s['server_cpu_ms'].show('{:.0f}', ' ms')}",
                        "≤ 1.1×",
                        s["ratio"].median <= 1.1,
                        s.failures,
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_b12() -> list[dict[str, str]]:
    from tests.pgserver import PgServer, pg_bin

    found = pg_bin()
    if found is None:
        raise SystemExit("B12 needs PostgreSQL's binaries (apt-get install postgresql)")
    pg, work = PgServer(found), b.temp_dir()
    try:
        pg.start()
        with fake_server(latency=1.0, sub_latency=0.5) as server:
            s = repeat(
                REPEATS,
                lambda: fleet_bench.b12_failover(
                    server, database_url=pg.create_database(), runs_each=16, timeout_s=15, turns=12, work=work
                ),
            )
    finally:
        pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    every = all(value == 32 for value in s["within"].values) and all(value == 32 for value in s["lost"].values)
    finished = all(value == 16 for value in s["others_final"].values)
    return [
        row(
            "B12",
            "failover: two replicas on PostgreSQL, 16 runs started on each (12 cells, root 1 s per turn); "
            "each run of the first also followed through the second; the first killed with SIGKILL mid-burst. "
            "Its 32 followers (16 following through the second, 16 clients re-attached to it) that got "
            "`error` `lost` within RLM_REPLICA_TIMEOUT_S (15 s); seconds from the kill to their terminal "
            "event: median, slowest",
            f"{s['within'].show('{:.0f}')} of 32; {s['median_s'].show(unit=' s')}, {s['max_s'].show(unit=' s')}",
            "32 of 32, ≤ 15 s",
            every,
        ),
        row(
            "B12",
            "… the second replica's 16 runs that ended `final`",
            f"{s['others_final'].show('{:.0f}')} of 16",
            "16 of 16",
            finished,
        ),
    ]


def bench_b9() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        s = repeat(REPEATS, lambda: r.b9_reattach(work=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row(
            "B9",
            "re-attach: a detached run's client drops after event 2, 5 or 9 and reconnects 0.3 s later with "
            "`Last-Event-ID`: events lost; repeated; reconnect → first missed event",
            f"{s['lost'].median:.0f}; {s['repeated'].median:.0f}; {s['reconnect_ms'].show('{:.1f}', ' ms')}",
            "0; 0; < 50 ms",
            s["lost"].high == 0 and s["repeated"].high == 0 and s["reconnect_ms"].median < 50,
            s.failures,
        )
    ]


def bench_b10() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        s = repeat(REPEATS, lambda: r.b10_follow_up(size=10**9, work=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row(
            "B10",
            "a follow-up on a 1 GB input: time to its first cell's output, ÷ a fresh run's that uploads "
            "the input again (first byte sent → first output)",
            f"{s['ratio_pct'].show('{:.2f}', '%')} ({s['follow_up_s'].show('{:.3f}', ' s')} vs "
            f"{s['fresh_s'].show(unit=' s')})",
            "< 1%",
            s["ratio_pct"].median < 1,
            s.failures,
        )
    ]


def b6_sessions_rows() -> list[dict[str, str]]:
    sizes = (1000, 10**9)
    with fake_server() as server:
        s = repeat(REPEATS, lambda: r.b6_session(server.url, sizes=sizes, questions=5))
    cells = "; ".join(
        f"{label}: {s[f'first_{size}'].median:,.0f} → {s[f'last_{size}'].median:,.0f}"
        for size, label in zip(sizes, ("1 KB", "1 GB"), strict=True)
    )
    spread = s["last_spread_pct"].median
    return [
        row(
            "B6",
            "… in a session: root input tokens of the 1st and of the 5th question's first request, by "
            "input size (the growth is the earlier questions and answers)",
            cells,
            "5th equal within 1% across sizes",
            spread <= 1.0,
            s.failures,
        )
    ]


def bench_b13() -> list[dict[str, str]]:
    work = b.temp_dir()
    try:
        with fake_server(latency=1.0, sub_latency=0.5) as server:
            s = repeat(
                REPEATS,
                lambda: busy_cells.b13_beside_computing_cells(
                    server, runs=16, batch=50, spinners=8, spin_s=12, work=work
                ),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row(
            "B13",
            "16 concurrent runs at realistic latencies (B11's) beside 8 runs whose cell computes: total wall ÷ "
            "the same burst's alone; the slowest `/health` answer during it",
            f"{s['ratio'].show(unit='×')} ({s['beside_s'].show(unit=' s')} vs {s['alone_s'].show(unit=' s')}); "
            f"{s['health_max_ms'].show('{:.0f}', ' ms')}",
            "≤ 1.1×",
            s["ratio"].median <= 1.1,
            s.failures,
        )
    ]


BENCHMARKS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "B1": bench_b1,
    "B2": bench_b2,
    "B3": bench_b3,
    "B4": bench_b4,
    "B5": bench_b5,
    "B6": bench_b6,
    "B7": bench_b7,
    "B9": bench_b9,
    "B10": bench_b10,
    "B11": bench_b11,
    "B12": bench_b12,
    "B13": bench_b13,
}


def bench_of(number: str) -> str:
    """The benchmark a row belongs to (B8's rows come from B7's runs)."""
    return "B7" if number == "B8" else number


def read_table(text: str) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """The machine line and the rows, by benchmark, of the committed table."""
    match = re.search(re.escape(TABLE_START) + "(.*?)" + re.escape(TABLE_END), text, flags=re.S)
    if match is None:
        raise SystemExit(f"{DOCUMENT.name} has no {TABLE_START} … {TABLE_END} block")
    machine_line = ""
    rows: dict[str, list[dict[str, str]]] = {}
    for line in match.group(1).strip().splitlines():
        if line.startswith(MACHINE_LINE):
            machine_line = line[len(MACHINE_LINE) :].rstrip(".")
        if not re.match(r"\| B\d+ ", line):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != len(COLUMNS):
            raise SystemExit(f"cannot read this row of {DOCUMENT.name} (expected {len(COLUMNS)} cells): {line}")
        entry = dict(zip(COLUMNS, cells, strict=True))
        rows.setdefault(bench_of(entry["n"]), []).append(entry)
    return machine_line, rows


def render(rows: dict[str, list[dict[str, str]]], machine_line: str) -> str:
    lines = [*HEADER]
    lines += [
        "| " + " | ".join(r[column] for column in COLUMNS) + " |" for key in BENCHMARKS for r in rows.get(key, [])
    ]
    return f"{TABLE_START}\n{MACHINE_LINE}{machine_line}.\n\n" + "\n".join(lines) + f"\n{TABLE_END}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", default=list(BENCHMARKS), help="B1 … B7, B9 … B13 (B8 comes with B7)")
    args = parser.parse_args()
    wanted = list(dict.fromkeys(bench_of(name.upper()) for name in args.which))
    unknown = [name for name in wanted if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}: choose among {', '.join(BENCHMARKS)} and B8")
    text = DOCUMENT.read_text()
    previous_machine, rows = read_table(text)
    here = machine()
    if previous_machine and previous_machine != here:
        print(f"note: the rows kept were measured on another machine ({previous_machine}); they say so", flush=True)
        for key, kept in rows.items():
            if key not in wanted:
                for entry in kept:
                    if "another machine" not in entry["when"]:
                        entry["when"] += f", on another machine: {previous_machine}"
    when = stamp()
    for name in wanted:
        print(f"--- {name}", flush=True)
        rows[name] = BENCHMARKS[name]()
        for entry in rows[name]:
            entry["when"] = when
            print(
                f"{entry['n']}: {entry['what']}: {entry['measured']} (target {entry['target']}, met: {entry['met']})",
                flush=True,
            )
        start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
        DOCUMENT.write_text(text[:start] + render(rows, here) + text[end:])
    print(f"wrote {DOCUMENT}")


if __name__ == "__main__":
    main()
