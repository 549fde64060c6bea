"""Server processes sharing one host: worker uids, and the files a server killed with -9 leaves behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from pathlib import Path

import httpx2
import pytest

from tests.conftest import RealServer, SseEvent, script, spawn_server, stream_run, wait_until, worker_processes
from tests.test_hostile import KEY, outputs


def has_worker(server: RealServer) -> bool:
    return bool(worker_processes(server.pid))


@pytest.mark.skipif(os.geteuid() != 0, reason="worker uids are given out only by a server running as root")
def test_two_servers_on_one_host_give_their_runs_different_uids(tmp_path: Path) -> None:
    """While server A's worker runs a cell, server B runs one too: their workers run as different uids,
    and B's run and its cleanup leave A's worker alone. Today each server counted uids from 61000 on its
    own: both workers were 61000, so ending B's by uid could end A's, and A's processes counted against
    B's limit. Mutant: `_claim` that neither locks nor looks for processes of the uid (today's counter)
    → the same uid twice."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results: dict[str, list[SseEvent]] = {}
    with spawn_server(tmp_path / "a", KEY) as a, spawn_server(tmp_path / "b", KEY) as b:
        holder = threading.Thread(
            target=lambda: results.update(a=a.run("import os, time\nprint(os.getuid())\ntime.sleep(4)"))
        )
        holder.start()
        assert wait_until(lambda: has_worker(a), timeout=30)
        results["b"] = b.run("import os\nprint(os.getuid())")
        holder.join(60)
        a.assert_healthy()
        b.assert_healthy()
    first, second = outputs(results["a"])[0], outputs(results["b"])[0]
    assert first["error"] is None and second["error"] is None, (first["error"], second["error"])
    assert first["stdout"] != second["stdout"], (first["stdout"], second["stdout"])


def holding(directory: Path, marker: str) -> list[Path]:
    """Files under `directory` that contain `marker`."""
    found = []
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and marker.encode() in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def test_run_files_of_a_killed_server_are_gone_once_it_restarts(tmp_path: Path) -> None:
    """kill -9 of a server in the middle of a run and of an upload, then a restart: neither the run's
    input nor the spooled upload is left in the temporary directory. Today both stayed there for ever
    (the issue: input.txt after a restart). Mutant: skip `remove_stale_instances` in
    `_Instance.directory` → the files are still there after the restart."""
    marker = f"kill-nine-{secrets.token_hex(8)}"
    temporary, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temporary.mkdir()
    cwd.mkdir()
    with spawn_server(cwd, KEY, TMPDIR=str(temporary)) as first:
        body = {"prompt": script({"code": ["import time\ntime.sleep(60)"]}), "input_data": f"input {marker}"}

        def run_until_killed() -> None:
            with contextlib.suppress(httpx2.HTTPError):
                stream_run(first.url, json_body=body, timeout=90)

        threading.Thread(target=run_until_killed, daemon=True).start()
        upload = socket.create_connection(("127.0.0.1", int(first.url.rsplit(":", 1)[1])))
        boundary = "spooled"
        upload.sendall(
            f"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
            f'Content-Disposition: form-data; name="prompt"\r\n\r\nsummarize\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="input_file"; filename="in.txt"\r\n\r\n'.encode()
            + f"upload {marker} ".encode() * 20_000
        )
        try:
            assert wait_until(lambda: len(holding(temporary, marker)) == 2, timeout=30), holding(temporary, marker)
            first.process.kill()
            first.process.wait(10)
            assert len(holding(temporary, marker)) == 2  # what kill -9 leaves behind
        finally:
            upload.close()
    with spawn_server(cwd, KEY, TMPDIR=str(temporary)) as second:
        assert holding(temporary, marker) == []
        second.assert_healthy()
