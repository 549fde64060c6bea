"""The run history on a disk that fills up: runs go on, the history answers, recording resumes, and what waits
in memory meanwhile stays bounded.

The disk is real: a 16 MiB tmpfs mounted for the test and filled by it, so SQLite meets the same `ENOSPC`
as on a full disk. Mounting needs root (CI runs as root); elsewhere the test is skipped.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from rlm_service import storewriter
from rlm_service.events import AnswerEvent, CodeEvent
from rlm_service.store_sqlite import SqliteRunStore
from rlm_service.storewriter import MAX_BACKLOG
from tests.conftest import LiveServer, make_settings, run_record, script, stream_run, wait_until
from tests.fake_openai import FakeOpenAI
from tests.test_store import _final, _start


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB file system of the test's own, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "rlm-test-disk", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:  # lazily: a test that failed may leave a file open on it
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def _fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full. Unbuffered: a buffered file keeps what its last
    write could not place, and closing it raises ENOSPC again."""
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_does_not_stop_the_history(
    small_disk: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """With the history's disk full, a run still ends with its answer, the history lists and deletes within
    seconds, and once space is free again the run made meanwhile is in the history, whole, as is the next one.
    Mutants: an unguarded `ROLLBACK` after a failed commit (it raises "no transaction is active": the writes are
    lost); failed writes dropped instead of kept (the run made meanwhile is missing); a delete queued behind the
    stuck writes (it answers after 10 s instead of at once)."""
    caplog.set_level(logging.WARNING, logger="rlm_service")
    settings = make_settings(fake, rlm_history_db=str(small_disk / "history.sqlite3"))
    with LiveServer(settings) as server:
        client = httpx2.Client(base_url=server.url, timeout=60)
        _, before = stream_run(server.url, json_body={"prompt": "task before", "input_data": "some data"})
        kept_id = before[0].data["run_id"]
        assert wait_until(lambda: client.get(f"/api/runs/{kept_id}").status_code == 200)

        _fill(small_disk / "filler")
        answer = "y" * 500_000  # more than the write-ahead log has room for, less than the page cache holds
        during = script({"code": [f"answer.update(content='y' * {len(answer)}, ready=True)"]})
        _, events = stream_run(server.url, json_body={"prompt": during, "input_data": "x"})
        assert events[-1].event == "final" and events[-1].data["answer"] == answer
        run_id = events[0].data["run_id"]
        assert wait_until(lambda: "cannot be written" in caplog.text, timeout=10)
        assert "full" in caplog.text

        started = time.monotonic()
        assert client.get("/api/runs").status_code == 200
        deleted = client.delete(f"/api/runs/{kept_id}")
        assert deleted.status_code in (204, 503), deleted.text
        assert time.monotonic() - started < 5
        assert client.get("/health").json() == {"status": "ok"}

        (small_disk / "filler").unlink()
        assert wait_until(lambda: client.get(f"/api/runs/{run_id}").status_code == 200, timeout=20)
        stored = client.get(f"/api/runs/{run_id}").json()
        assert [event["type"] for event in stored["events"]] == [event.event for event in events]
        assert [event["seq"] for event in stored["events"]] == list(range(1, len(events) + 1))
        assert stored["run"]["status"] == "finished" and stored["run"]["answer"] == answer
        assert "writing again" in caplog.text

        _, after = stream_run(server.url, json_body={"prompt": "task after", "input_data": "more data"})
        after_id = after[0].data["run_id"]
        assert wait_until(lambda: client.get(f"/api/runs/{after_id}").status_code == 200)
        assert client.get(f"/api/runs/{after_id}").json()["run"]["status"] == "finished"


def test_while_the_disk_is_full_the_waiting_events_are_bounded(
    small_disk: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `MAX_BACKLOG` waiting writes, plain events are dropped (and counted); the run's end is kept.
    Mutant: no backlog check (all 12,000 events wait in memory, then are all written). The writer's first
    retry waits 5 s here, past the time the 12,000 events take to record even on a busy machine: a retry
    during them can succeed on a full disk (in the space the failed write had taken before it was rolled
    back) and let more of them through."""
    caplog.set_level(logging.WARNING, logger="rlm_service")
    monkeypatch.setattr(storewriter, "RETRY_FIRST_S", 5.0)
    store = SqliteRunStore(small_disk / "history.sqlite3")
    store.begin(run_record("r", 1.0))
    store.record("r", _start("r"))
    assert store.flush()
    _fill(small_disk / "filler")
    store.record("r", AnswerEvent(run_id="r", content="y" * 500_000, ready=False))
    assert wait_until(lambda: store.failure is not None)
    for index in range(12_000):
        store.record("r", CodeEvent(run_id="r", iteration=1, code=str(index)))
    store.record("r", _final("r", "done"))
    (small_disk / "filler").unlink()
    assert wait_until(lambda: store.status("r") == "finished", timeout=30)
    events = store.events("r")
    assert events[-1]["type"] == "final" and events[-1]["seq"] == 12_003
    assert events[1]["type"] == "answer" and len(events) == MAX_BACKLOG + 2  # with the start, written before
    assert f"{12_003 - len(events)} events were dropped meanwhile" in caplog.text
    store.close()
