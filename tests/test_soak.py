"""Soak: 200 runs in sequence and 20 at once against the real server process; nothing leaks."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from tests.conftest import spawn_server, stream_run, wait_until, worker_processes

QUICK = 'quick <<<SCRIPT [{"code": ["x = llm_query(context)\\nanswer.update(content=x, ready=True)"]}] SCRIPT>>>'


def our_temp_files() -> set[str]:
    return {path.name for path in Path(tempfile.gettempdir()).glob("rlm-*")}


def test_two_hundred_runs_then_twenty_at_once_leak_nothing(tmp_path: Path) -> None:
    temp_before = our_temp_files()
    with spawn_server(tmp_path) as server:
        for index in range(10):  # warm up: imports, pools and caches settle before we measure
            stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"warm {index}"})
        rss_before, fds_before = server.rss(), server.open_fds()
        for index in range(200):
            _, events = stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"run {index}"})
            assert events[-1].event == "final", events[-1].data
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
        assert all(f"together {i}" in results[i] or "sub-model reply" in results[i] for i in range(20))
        assert wait_until(lambda: worker_processes() == [], timeout=5)
        for index in range(3):
            stream_run(server.url, json_body={"prompt": QUICK, "input_data": f"after {index}"})
        assert server.open_fds() <= fds_before + 2, (fds_before, server.open_fds())
        growth = server.rss() - rss_before
        assert growth < 50 * 2**20, f"server memory grew by {growth / 2**20:.1f} MB"
        assert server.fake.stats.root_requests >= 230
    assert wait_until(lambda: our_temp_files() <= temp_before, timeout=5)
