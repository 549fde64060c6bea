"""Soak: 200 runs in sequence and 20 at once against the real server process; nothing leaks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.conftest import run_leftovers, spawn_server, stream_run, wait_until, worker_processes

QUICK = 'quick <<<SCRIPT [{"code": ["x = llm_query(context)\\nanswer.update(content=x, ready=True)"]}] SCRIPT>>>'


def test_two_hundred_runs_then_twenty_at_once_leak_nothing(tmp_path: Path) -> None:
    """220 runs leave no worker, file descriptor, temporary file or memory behind, and 20 runs at once each
    get their own input's reply. Mutants caught: a workspace not removed; sub-call replies handed to the
    wrong run (each reply must be exactly its own input's echo)."""
    with spawn_server(tmp_path) as server:
        server.fake.sub = lambda prompt: f"echo<{prompt}>"
        for index in range(10):  # warm up: imports, pools and caches settle before we measure
            stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"warm {index}"})
        rss_before, fds_before = server.rss(), server.open_fds()
        for index in range(200):
            _, events = stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"run {index}"})
            assert events[-1].event == "final" and events[-1].data["answer"] == f"echo<run {index}>", events[-1].data
        assert server.open_fds() <= fds_before + 2, (fds_before, server.open_fds())
        results: dict[int, str] = {}

        def one(index: int) -> None:
            _, events = stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"together {index}"})
            results[index] = events[-1].data.get("answer", "")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {i: f"echo<together {i}>" for i in range(20)}
        assert wait_until(lambda: worker_processes(server.pid) == [], timeout=30)
        for index in range(3):
            stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"after {index}"})
        assert server.open_fds() <= fds_before + 2, (fds_before, server.open_fds())
        growth = server.rss() - rss_before
        assert growth < 50 * 2**20, f"server memory grew by {growth / 2**20:.1f} MB"
        assert server.fake.stats.root_requests == 233 and server.fake.stats.sub_requests == 233
    # nothing of the runs is left in the server's TMPDIR (which we watch: the zygote's cache went there)
    assert server.tmp is not None and (server.tmp / f"rlm-matplotlib-{os.getuid()}").is_dir()
    assert run_leftovers(server.tmp) == []
