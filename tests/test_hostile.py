"""Hostile generated code against the real server process (`python backend/main.py`).

The server holds a key in its environment and in its `.env`; each test runs a cell that attacks, then
checks that the attack failed, that the server is still up, and that the next run succeeds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RealServer, SseEvent, spawn_server, wait_until, worker_processes

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-hostile-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    with spawn_server(tmp_path_factory.mktemp("server"), KEY, RLM_EXEC_TIMEOUT_S="20",
                      RLM_WORKER_MEMORY_MB="1536") as real:
        yield real


def outputs(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == "output"]


def test_infinite_loop_is_stopped(server: RealServer) -> None:
    events = server.run("while True:\n    pass", exec_timeout_s=2)
    first = outputs(events)[0]
    assert "TimeoutError" in first["error"] and first["duration_ms"] < 6000
    assert events[-1].data["ready"]
    server.assert_healthy()


def test_memory_bomb_fails_cleanly(server: RealServer) -> None:
    before = server.rss()
    events = server.run("hog = []\nwhile True:\n    hog.append(bytearray(64 * 2**20))")
    assert "MemoryError" in outputs(events)[0]["error"]
    assert server.rss() - before < 50 * 2**20
    server.assert_healthy()


def test_fork_bomb_is_contained(server: RealServer) -> None:
    events = server.run("import os\nwhile True:\n    os.fork()", exec_timeout_s=15)
    error = outputs(events)[0]["error"] or ""
    assert "Resource temporarily unavailable" in error or "TimeoutError" in error
    server.assert_healthy()
    assert wait_until(lambda: worker_processes() == [], timeout=5)


def test_printing_a_gigabyte_keeps_the_server_flat(server: RealServer) -> None:
    before = server.rss()
    events = server.run("print('x' * 10**9)", "for _ in range(100_000):\n    print('y' * 10_000)")
    for output in outputs(events)[:2]:
        assert output["truncated"] and len(output["stdout"]) <= 8192
        assert "characters cut" in output["stdout"]
    assert server.rss() - before < 50 * 2**20
    server.assert_healthy()


def test_secrets_are_out_of_reach(server: RealServer) -> None:
    env_file = server.cwd / ".env"
    attack = f"""
import os, glob, subprocess
found = []
def attempt(name, fn):
    try:
        found.append((name, str(fn())[:2000]))
    except Exception as exc:
        found.append((name, 'DENIED ' + type(exc).__name__))
attempt('environ', lambda: dict(os.environ))
attempt('self environ', lambda: open('/proc/self/environ', 'rb').read())
attempt('server environ', lambda: open(f'/proc/{{os.getppid()}}/environ', 'rb').read())
attempt('server mem', lambda: open(f'/proc/{{os.getppid()}}/mem', 'rb').read(10))
attempt('server cmdline', lambda: open(f'/proc/{{os.getppid()}}/cmdline', 'rb').read())
attempt('server cwd', lambda: os.listdir(f'/proc/{{os.getppid()}}/cwd'))
attempt('server .env', lambda: open({str(env_file)!r}).read())
attempt('cat .env', lambda: subprocess.run(['cat', {str(env_file)!r}], capture_output=True).stdout)
attempt('all environs', lambda: [open(p, 'rb').read() for p in glob.glob('/proc/*/environ')])
for name, result in found:
    print(name, '=>', result[:300])
answer['content'] = repr(found)
"""
    events = server.run(attack)
    text = json.dumps([event.data for event in events])
    assert KEY not in text
    printed = outputs(events)[0]["stdout"]
    for name in ("server environ", "server mem", "server .env", "server cwd"):
        assert f"{name} => DENIED" in printed, printed
    server.assert_healthy()


def test_writes_outside_the_worker_directory_fail(server: RealServer) -> None:
    cells = [f"""
import os
for path in ['/tmp/rlm-evil.txt', {str(ROOT / 'backend' / 'evil.py')!r}, {str(server.cwd / '.env')!r}, '/var/tmp/evil']:
    try:
        open(path, 'a').write('pwned')
        print('WROTE', path)
    except OSError as exc:
        print('refused', path, type(exc).__name__)
open('mine.txt', 'w').write('fine')
print('own directory ok', open('mine.txt').read())
"""]
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "WROTE" not in printed and printed.count("refused") == 4 and "own directory ok fine" in printed
    assert not (ROOT / "backend" / "evil.py").exists() and not Path("/tmp/rlm-evil.txt").exists()
    assert KEY in (server.cwd / ".env").read_text() and "pwned" not in (server.cwd / ".env").read_text()
    server.assert_healthy()


def test_the_server_cannot_be_signalled(server: RealServer) -> None:
    cells = ["""
import os, signal
for name, fn in [('kill server', lambda: os.kill(os.getppid(), signal.SIGKILL)),
                 ('kill everyone', lambda: os.kill(-1, signal.SIGKILL)),
                 ('kill server group', lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)),
                 ('kill pid 1', lambda: os.kill(1, signal.SIGTERM))]:
    try:
        fn()
        print(name, 'SENT')
    except OSError as exc:
        print(name, 'refused', type(exc).__name__)
"""]
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "SENT" not in printed and printed.count("refused") == 4
    server.assert_healthy()


def test_cell_hung_on_a_subcall_is_stopped(server: RealServer) -> None:
    server.fake.inject("timeout", role="sub", count=1)
    events = server.run("reply = llm_query('never answered')", exec_timeout_s=2)
    assert "TimeoutError" in outputs(events)[0]["error"]
    server.assert_healthy()


def test_data_cannot_be_sent_out_over_the_network(server: RealServer) -> None:
    port = server.fake.port
    cells = [f"""
import socket, urllib.request
for name, fn in [('tcp', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2)),
                 ('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))),
                 ('http', lambda: urllib.request.urlopen('http://127.0.0.1:{port}/v1/models', timeout=2)),
                 ('unix', lambda: socket.socket(socket.AF_UNIX).connect('/run/docker.sock'))]:
    try:
        fn()
        print(name, 'CONNECTED')
    except Exception as exc:
        print(name, 'refused', type(exc).__name__)
"""]
    requests_before = server.fake.stats.requests
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "CONNECTED" not in printed and printed.count("refused") == 4
    assert server.fake.stats.requests - requests_before == 2  # the two root turns, nothing from the cell
    server.assert_healthy()


def test_forged_channel_messages_only_hurt_their_own_run(server: RealServer) -> None:
    cells = ["""
import os, struct, json
body = json.dumps({'op': 'done', 'stdout': 12345, 'notes': 'not a list', 'answer_ready': 'yes'}).encode()
for fd in range(3, 12):
    try:
        os.write(fd, struct.pack('>I', len(body)) + body)
        os.write(fd, struct.pack('>I', 2**31) + b'garbage')
    except OSError:
        pass
"""]
    events = server.run(*cells)
    assert events[-1].event in ("final", "error")
    server.assert_healthy()


def test_no_worker_outlives_its_run(server: RealServer) -> None:
    server.run("import subprocess\nsubprocess.Popen(['sleep', '600'])")
    assert wait_until(lambda: worker_processes() == [], timeout=3)
    time.sleep(0.2)
    assert not any(b"sleep\x00600" in _cmdline(int(p)) for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
