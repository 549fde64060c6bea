"""Hostile generated code against the real server process (`python backend/main.py`).

The server holds a key in its environment and in its `.env`; each test runs a cell that attacks, then
checks that the attack failed, that the server is still up, and that the next run succeeds.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import (
    RealServer,
    SseEvent,
    descendant_commands,
    peak_rss,
    spawn_server,
    wait_until,
    worker_processes,
)
from tests.fake_openai import default_sub_reply

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-hostile-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    with spawn_server(
        tmp_path_factory.mktemp("server"), KEY, RLM_EXEC_TIMEOUT_S="20", RLM_WORKER_MEMORY_MB="1536"
    ) as real:
        yield real


def outputs(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == "output"]


@dataclass
class HealthWatch:
    """The slowest `/health` answer seen while the watch ran (one request after another, one connection)."""

    slowest: float = 0.0
    answers: int = 0


@contextmanager
def health_watch(server: RealServer) -> Iterator[HealthWatch]:
    """Ask `/health` over and over in a thread while the block runs; a request that took longer than its
    timeout counts as that long."""
    watch = HealthWatch()
    stop = threading.Event()

    def probe() -> None:
        with httpx2.Client(timeout=10) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.get(f"{server.url}/health").raise_for_status()
                except httpx2.HTTPError:
                    pass
                watch.slowest = max(watch.slowest, time.monotonic() - started)
                watch.answers += 1
                stop.wait(0.02)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(15)


CHANNEL = """
import os, socket, stat
channel = next(fd for fd in sorted(map(int, os.listdir('/proc/self/fd')))
               if fd > 2 and os.path.exists(f'/proc/self/fd/{fd}') and stat.S_ISSOCK(os.fstat(fd).st_mode))
raw = socket.socket(fileno=os.dup(channel))
"""


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
    """The run's process cap (RLM_WORKER_PROCESSES) stops the bomb: fork fails at once. Mutant caught: no
    process limit (the cell then runs into its timeout, which this test does not accept)."""
    events = server.run("import os\nwhile True:\n    os.fork()", exec_timeout_s=15)
    error = outputs(events)[0]["error"] or ""
    assert "Resource temporarily unavailable" in error, error
    server.assert_healthy()
    assert wait_until(lambda: worker_processes(server.pid) == [], timeout=5)


def test_a_cell_cannot_hold_more_open_files_than_a_workers_share(server: RealServer) -> None:
    """A cell that opens descriptors until it cannot gets an error past 1024 (`sandbox.WORKER_OPEN_FILES`), not
    the server's own limit, which the server raises to its hard limit. Mutant caught: no limit of the worker's
    own (the cell held as many as the server may: 20,000 here)."""
    events = server.run(
        "import os\nheld = []\ntry:\n    while len(held) < 100_000:\n        held.append(os.dup(0))\n"
        "except OSError as exc:\n    stopped = str(exc)\nanswer.update(content=f'{len(held)} {stopped}', ready=True)"
    )
    count, _, reason = events[-1].data["answer"].partition(" ")
    assert 900 < int(count) < 1024 and "Too many open files" in reason, events[-1].data
    server.assert_healthy()


def test_printing_a_gigabyte_keeps_the_server_flat(server: RealServer) -> None:
    before = server.rss()
    events = server.run("print('x' * 10**9)", "for _ in range(100_000):\n    print('y' * 10_000)")
    for output in outputs(events)[:2]:
        assert output["truncated"] and len(output["stdout"]) <= 8192
        assert "characters cut" in output["stdout"]
    assert server.rss() - before < 50 * 2**20
    server.assert_healthy()


def test_writing_to_the_stderr_descriptor_without_end_is_read_at_a_bounded_pace(server: RealServer) -> None:
    """A cell writes to descriptor 2 (the pipe whose last kilobytes the server keeps for a crash's error) for 3 s:
    the server reads it at 6.5 MB/s at most (`STDERR_PAUSE_S`), so the cell gets a few tens of MB through, and
    `/health` keeps answering. Old behaviour caught (the attack pass): the server read all it was given, 7.6 GB in
    10 s, three quarters of a core of its event loop; here the old code let the cell write gigabytes."""
    cell = """
import os, time
block, written, end = b'E' * 65536, 0, time.monotonic() + 3
while time.monotonic() < end:
    written += os.write(2, block)
print(written)
"""
    with health_watch(server) as health:
        events = server.run(cell)
    assert int(outputs(events)[0]["stdout"]) < 100 * 2**20, outputs(events)[0]
    assert health.answers and health.slowest < 2.0, health
    server.assert_healthy()


def test_line_separators_in_output_leave_the_event_stream_readable_line_by_line(server: RealServer) -> None:
    """A cell prints and answers NEL, U+2028 and U+2029, which JSON leaves raw: the stream carries them escaped,
    so a reader that splits lines as `str.splitlines` does (httpx's `iter_lines`, which `server.run` reads with)
    still gets whole events, and the text comes back as it was. Old behaviour caught (the attack pass): the raw
    characters cut the output event in two for such readers, and the run's stream failed to parse."""
    breaks = "a\x85b\u2028c\u2029d"
    events = server.run(f"print({breaks!r})\nanswer['content'] = {breaks!r}")
    assert outputs(events)[0]["stdout"] == breaks + "\n"
    assert events[-1].event == "final" and events[-1].data["answer"] == breaks


def test_the_kernel_ends_a_worker_before_the_server_when_memory_runs_out(server: RealServer) -> None:
    """Workers carry the highest out-of-memory score adjustment (the zygote sets it, its children inherit it),
    and the server keeps its own: out of memory, the kernel ends a run's worker, not the server and every run
    with it. Mutant caught: the zygote without it (the worker's adjustment was the server's, 0)."""
    printed = outputs(server.run("print(open('/proc/self/oom_score_adj').read().strip())"))[0]["stdout"]
    assert printed.strip() == "1000", printed
    own = Path("/proc/self/oom_score_adj").read_text()  # what the server started with
    assert Path(f"/proc/{server.pid}/oom_score_adj").read_text() == own


PRIORITY_CELL = """
import os, subprocess, sys
def group():
    try:
        return open('/proc/self/autogroup').read().strip()
    except OSError:
        return 'no autogroup'
print(os.getpriority(os.PRIO_PROCESS, 0))
print(os.getsid(0) == os.getpid())
print(group())
for raise_back in (lambda: os.setpriority(os.PRIO_PROCESS, 0, 0), lambda: open('/proc/self/autogroup', 'w').write('0')):
    try:
        raise_back()
        print('RAISED')
    except OSError as exc:
        print('refused', type(exc).__name__)
# A program it starts is dumpable again, and owns its /proc files.
program = subprocess.run([sys.executable, '-c', "open('/proc/self/autogroup', 'w').write('0')"], capture_output=True)
print('program', 'RAISED' if program.returncode == 0 else 'refused')
print(group())
"""


def cells_yield_the_cpu(server: RealServer) -> bool:
    """A cell runs 10 nice levels below the server and leads no session; its scheduling group (autogroup, where
    the kernel weighs sessions first) is not the server's, and is weighted 10 levels below it; the cell's own
    process can raise neither back. Returns whether a program the cell started could not set the group's weight
    back either. /proc shows no group for the root one, that of init's session, which a server in a container (as
    in CI) may never have left; its processes are weighed by their own niceness there."""
    printed = outputs(server.run(PRIORITY_CELL))[0]["stdout"].splitlines()
    niceness, leads_a_session, group, *raising, program, group_after = printed
    refused = "refused PermissionError"
    assert raising == [refused, "refused FileNotFoundError" if group == "no autogroup" else refused], raising
    assert int(niceness) == min(os.getpriority(os.PRIO_PROCESS, server.pid) + 10, 19)
    assert leads_a_session == "False"
    if group == "no autogroup":
        return program == "program refused"
    root_group = ["(the root group)", str(os.getpriority(os.PRIO_PROCESS, server.pid))]  # weighed by niceness there
    servers = Path(f"/proc/{server.pid}/autogroup").read_text().split() or root_group
    assert group.split()[0] != servers[0] and group.split()[-1] == str(min(int(servers[-1]) + 10, 19)), group
    return program == "program refused" and group_after == group


def test_cells_compute_at_a_lower_priority_than_the_server(server: RealServer) -> None:
    """Workers run 10 nice levels below the server (the zygote lowers its own, its children inherit it), and
    share the zygote's scheduling group: where the kernel weighs sessions first (autogroup), the group's weight
    is lowered the same way, so that cells computing in many runs leave the server the CPU it needs. A cell can
    raise neither back, nor can a program it starts (an unprivileged process may set its group's weight back to
    the default; Landlock keeps it from /proc's files). Mutants caught: the zygote without it (the worker's
    niceness was the server's); workers in sessions of their own (`setsid`: each its own group, of the default
    weight)."""
    assert cells_yield_the_cpu(server)


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


def test_the_hosts_private_keys_are_out_of_reach(server: RealServer) -> None:
    """The directories of the host's TLS private keys are refused, however the worker is confined. Old behaviour
    caught (the attack pass, a root server whose Python installation only root can read, so that its workers keep
    CAP_DAC_READ_SEARCH within Landlock's rules): Landlock let them read all of /etc/ssl and /etc/pki, and a key
    of mode 600 in /etc/ssl/private was read whole."""
    cell = """
import os
for path in ('/etc/ssl/private', '/etc/pki/tls/private', '/etc/pki/CA/private'):
    try:
        print(path, 'LISTED', os.listdir(path))
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(path, 'refused', type(exc).__name__)
"""
    printed = outputs(server.run(cell))[0]["stdout"]
    assert "LISTED" not in printed, printed
    server.assert_healthy()


def test_writes_outside_the_worker_directory_fail(server: RealServer) -> None:
    targets = [
        str(Path(tempfile.gettempdir()) / "rlm-evil.txt"),
        str(ROOT / "backend" / "evil.py"),
        str(server.cwd / ".env"),
        "/var/tmp/evil",
    ]
    cells = [
        f"""
import os
for path in {targets!r}:
    try:
        open(path, 'a').write('pwned')
        print('WROTE', path)
    except OSError as exc:
        print('refused', path, type(exc).__name__)
open('mine.txt', 'w').write('fine')
print('own directory ok', open('mine.txt').read())
"""
    ]
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "WROTE" not in printed and printed.count("refused") == 4 and "own directory ok fine" in printed
    assert not Path(targets[0]).exists() and not Path(targets[1]).exists()
    assert KEY in (server.cwd / ".env").read_text() and "pwned" not in (server.cwd / ".env").read_text()
    server.assert_healthy()


def test_the_server_cannot_be_signalled(server: RealServer) -> None:
    cells = [
        """
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
"""
    ]
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "SENT" not in printed and printed.count("refused") == 4
    server.assert_healthy()


def test_an_answer_of_hostile_objects_neither_kills_the_worker_nor_the_run(server: RealServer) -> None:
    """`answer` replaced by a dict subclass whose methods raise, or holding objects whose `__str__` and `__bool__`
    raise: the cell's output and the REPL's variables are kept and the run goes on. Mutant: `_normalize_answer`
    reads any `isinstance(value, dict)` with its own `get` and converts with bare `str()`/`bool()` (the worker
    died with status 0: `WorkerDied`, the cell's output and every variable lost)."""
    cells = [
        """
class Evil(dict):
    def get(self, *args):
        raise RuntimeError('boom')
    def __getitem__(self, key):
        raise RuntimeError('boom')
answer = Evil(content='x', ready=True)
x = 41
print('cell one ran')
""",
        """
class Bad:
    def __str__(self):
        raise RuntimeError('no str')
    def __bool__(self):
        raise RuntimeError('no bool')
answer = {'content': Bad(), 'ready': Bad()}
print(x + 1)
""",
        "print(x + 1, type(answer).__name__, answer['ready'])",
    ]
    events = server.run(*cells)
    printed = [(o["stdout"], o["error"]) for o in outputs(events)[:3]]
    assert printed == [("cell one ran\n", None), ("42\n", None), ("42 dict False\n", None)], printed
    assert events[-1].event == "final" and events[-1].data["ready"]
    server.assert_healthy()


def test_cell_hung_on_a_subcall_is_stopped(server: RealServer) -> None:
    server.fake.inject("timeout", role="sub", count=1)
    events = server.run("reply = llm_query('never answered')", exec_timeout_s=2)
    assert "TimeoutError" in outputs(events)[0]["error"]
    server.assert_healthy()


def test_data_cannot_be_sent_out_over_the_network(server: RealServer) -> None:
    port = server.fake.port
    cells = [
        f"""
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
"""
    ]
    requests_before = server.fake.stats.requests
    events = server.run(*cells)
    printed = outputs(events)[0]["stdout"]
    assert "CONNECTED" not in printed and printed.count("refused") == 4
    assert server.fake.stats.requests - requests_before == 2  # the two root turns, nothing from the cell
    server.assert_healthy()


def test_forged_channel_messages_only_hurt_their_own_run(server: RealServer) -> None:
    cells = [
        """
import os, struct, json
body = json.dumps({'op': 'done', 'stdout': 12345, 'notes': 'not a list', 'answer_ready': 'yes'}).encode()
for fd in range(3, 12):
    try:
        os.write(fd, struct.pack('>I', len(body)) + body)
        os.write(fd, struct.pack('>I', 2**31) + b'garbage')
    except OSError:
        pass
"""
    ]
    events = server.run(*cells)
    assert events[-1].event == "final" and events[-1].data["ready"]  # the run goes on after its worker is replaced
    assert "ProtocolError" in (outputs(events)[0]["error"] or "")
    server.assert_healthy()


def test_no_worker_outlives_its_run(server: RealServer) -> None:
    server.run("import subprocess\nsubprocess.Popen(['sleep', '600'])")
    assert wait_until(lambda: worker_processes(server.pid) == [], timeout=10)
    assert wait_until(lambda: not any(b"sleep\x00600" in command for command in descendant_commands()), timeout=10)


def test_a_flood_on_the_channel_neither_freezes_nor_fills_the_server(server: RealServer) -> None:
    """A cell writes a 150 MB message head of `[],[],…` straight to its channel. Today's server read
    messages of up to 512 MiB whole and decoded them on the event loop (the issue's flood of this JSON
    stalled /health for a minute and took gigabytes; this one, whose first bytes today's format reads as
    a length, makes it hold some 450 MB). Now the head's announced size is refused before anything is
    read: the worker is replaced, the model is told, the run goes on. Mutant: raise
    protocol.MAX_HEAD_BYTES to 512 MiB → the head is parsed: /health stalls and the server's peak grows."""
    flood = (
        CHANNEL
        + """
body = b'[' + b'[],' * 50_000_000 + b'[]]'
raw.sendall(len(body).to_bytes(4, 'big') + bytes(4) + body)  # a head of 150 MB, no texts
"""
    )
    server.assert_healthy()  # a server's first run builds what later runs reuse: not part of the watch
    peak_before = peak_rss(server.pid)
    with health_watch(server) as watch:
        events = server.run(flood, "print('after the flood', len(context))")
    first, second = outputs(events)[:2]
    assert "ProtocolError" in first["error"] and "replaced" in first["error"], first["error"]
    assert first["duration_ms"] < 15_000
    assert second["stdout"] == "after the flood 9\n" and events[-1].event == "final"
    # On a quiet machine no answer takes 100 ms; the bound allows a loaded one (2.3 s seen with eight tests at
    # once on two cores) and still catches the mutant, whose stall lasts tens of seconds.
    assert watch.answers > 0 and watch.slowest < 5.0, watch
    assert peak_rss(server.pid) - peak_before < 100 * 2**20
    server.assert_healthy()


def test_requests_sent_faster_than_their_replies_are_read_hold_a_bounded_share_of_the_server(
    server: RealServer,
) -> None:
    """A cell stops its worker's reader of replies, then sends 100 `batch` requests of 100,000 empty prompts
    each on its channel: each costs the server nothing to read and makes a reply of 10 MB (refusals: the run's
    sub-call budget is far smaller). Old behaviour caught (the attack pass): every request was served at once and
    its reply written whatever the worker read, so the server's memory grew by about 11 MB a request (250 of
    them: 2.8 GB) until the cell's time ran out. Now the replies not yet sent count against the run's 64 MiB
    budget and at most MAX_REQUESTS_IN_FLIGHT requests are served at once: the cell stalls on its own channel
    until its time runs out, and the run goes on."""
    flood = """
import time
channel = [c.cell_contents for c in llm_batch.__closure__ if hasattr(c.cell_contents, '__self__')][0].__self__
class Stuck(dict):
    def pop(self, *args):
        time.sleep(10**6)  # the reader of replies stops at its first
channel._waiting = Stuck()
channel.send({"op": "batch", "id": 0}, [""])
for i in range(100):
    channel.send({"op": "batch", "id": 1000 + i}, [""] * 100_000)
"""
    server.assert_healthy()
    peak_before = peak_rss(server.pid)
    with health_watch(server) as watch:
        events = server.run(flood, "print('after the flood', len(context))", exec_timeout_s=10)
    grown = peak_rss(server.pid) - peak_before
    print(f"the server's peak memory grew by {grown / 2**20:.0f} MiB")
    assert grown < 300 * 2**20
    first, second = outputs(events)[:2]
    assert "TimeoutError" in (first["error"] or ""), first
    assert second["stdout"] == "after the flood 9\n" and events[-1].event == "final"
    assert watch.answers > 0 and watch.slowest < 2.0, watch
    server.assert_healthy()


def test_a_worker_that_dies_with_its_requests_at_the_cap_is_seen_at_once(server: RealServer) -> None:
    """A cell sends 70 requests of one prompt each straight on its channel while the sub-model takes 15 s to
    answer, and its worker exits two seconds in, while the server serves no more of its requests
    (MAX_REQUESTS_IN_FLIGHT): the cell ends with the worker's death then, not when a request in flight is
    answered, and the next cell runs. Old behaviour caught (the review of the cap): the server, reading nothing
    at the cap, saw the death only once the first reply came, 15 s later."""
    flood = """
import os, threading
channel = [c.cell_contents for c in llm_batch.__closure__ if hasattr(c.cell_contents, '__self__')][0].__self__
threading.Timer(2, os._exit, (3,)).start()
for i in range(70):
    channel.send({"op": "batch", "id": 1000 + i}, [f"question {i}"])
threading.Event().wait()
"""
    server.fake.sub_latency = 15.0
    try:
        events = server.run(flood, "print('after', len(context))", exec_timeout_s=20)
    finally:
        server.fake.sub_latency = 0.0
    first, second = outputs(events)[:2]
    assert "WorkerDied" in (first["error"] or "") and first["duration_ms"] < 12_000, first
    assert second["stdout"] == "after 9\n"


def test_requests_in_flight_hold_a_bounded_share_of_the_server(server: RealServer) -> None:
    """Eight threads of one cell each call llm_query with a 15 MB prompt while the sub-model takes three
    seconds to answer. The server holds at most 64 MiB of one run's prompts at a time (four of them): the
    rest wait, unread, in the worker. Today's server read them all at once. Mutant: a budget of 2**40 bytes
    in WorkerRepl → eight sub-calls start before the first reply."""
    cell = """
import threading
replies = []
def ask(n):
    replies.append(llm_query(str(n) * 15_000_000))
threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(replies), all(r.startswith('sub-model reply') for r in replies))
"""
    replied: list[float] = []

    def sub(prompt: str) -> str:
        replied.append(time.monotonic())  # just before the reply is sent
        return default_sub_reply(prompt)

    server.fake.sub, server.fake.sub_latency = sub, 3.0
    server.fake.stats.request_times.clear()
    try:
        events = server.run(cell)
    finally:
        server.fake.sub, server.fake.sub_latency = default_sub_reply, 0.0
        server.fake.stats.sub_prompts.clear()
    output = outputs(events)[0]
    assert output["stdout"] == "8 True\n", (output["error"], output["duration_ms"])
    started_before_a_reply = [t for t in server.fake.stats.request_times if t < min(replied)]
    assert len(started_before_a_reply) <= 1 + 4  # the root's first turn, and four prompts of 15 MB
    server.assert_healthy()


def test_calls_past_the_sub_call_budget_add_no_event_each(server: RealServer) -> None:
    """With a budget of one sub-call, a cell calls llm_query 2,000 times: the 1,999 refused calls come back at once,
    and their progress is throttled as any other (a few events), the last one giving the cell's totals. Old
    behaviour caught (the attack pass): each refused call added a `subcalls` event, a thousand a second, which the
    run held in memory and wrote to the history (14,000 events in 15 s; 20 cells of 300 s would make millions)."""
    events = server.run("for _ in range(2000):\n    llm_query('x')", max_subcalls=1)
    progress = [event.data for event in events if event.event == "subcalls"]
    assert 0 < len(progress) < 200, len(progress)
    last = progress[-1]
    assert (last["done"], last["failed"], last["total"]) == (2000, 1999, 2000), last
    assert events[-1].event == "final"


def test_a_too_large_llm_batch_is_refused_in_the_cell(server: RealServer) -> None:
    events = server.run("llm_batch(['x' * 17_000_000])", "llm_batch(['y' * 10_000_000] * 7)")
    first, second = outputs(events)[:2]
    assert "ValueError" in first["error"] and "at most 16,777,216 bytes" in first["error"]
    assert "split it into several calls" in second["error"]
    server.assert_healthy()


def test_a_sub_call_reply_past_the_cap_comes_back_as_an_error(server: RealServer) -> None:
    """The sub-model answers llm_query with 17 MiB of text. The server takes no reply over 16 MiB
    (llm.MAX_REPLY_BYTES): parsing a reply holds the event loop, in a thread too since the JSON parser keeps
    the GIL (under a 256 MiB cap a 200 MB reply stalled /health for a second). The cell gets an `Error:`
    string naming the cap, and the run goes on. Mutant: MAX_REPLY_BYTES at 256 MiB → the cell gets the
    whole reply."""
    server.fake.sub = lambda prompt: "y" * (17 * 2**20)
    try:
        events = server.run("reply = llm_query('hi')\nprint(len(reply), reply[:300])")
    finally:
        server.fake.sub = default_sub_reply
    printed = outputs(events)[0]["stdout"]
    assert printed.split()[1] == "Error:" and "larger than 16,777,216 bytes" in printed, printed[:400]
    assert events[-1].event == "final"
    server.assert_healthy()


def test_a_worker_holds_only_its_channel_and_standard_streams(server: RealServer) -> None:
    """A cell lists its descriptors and uses every pipe it holds but its stderr as the zygote's wake-up
    pipe would be used (steal a wake-up, then write one). Today's workers inherited that pipe: stealing
    its wake-ups could block the zygote and every later run's worker. Mutant: drop the closerange in
    `zygote._child` → the listing shows the pipe."""
    cell = """
import os, stat
kinds = {}
for fd in sorted(map(int, os.listdir('/proc/self/fd'))):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        continue  # the listing's own descriptor, closed by now
    kinds[fd] = 'socket' if stat.S_ISSOCK(mode) else 'pipe' if stat.S_ISFIFO(mode) else 'device'
    if stat.S_ISFIFO(mode) and fd > 2:
        os.set_blocking(fd, False)
        for use in (lambda: os.read(fd, 4096), lambda: os.write(fd, b'x')):
            try:
                use()
            except OSError:
                pass
print(kinds)
"""
    events = server.run(cell)
    assert outputs(events)[0]["stdout"] == "{0: 'device', 1: 'device', 2: 'pipe', 3: 'socket'}\n"
    started = time.monotonic()
    server.assert_healthy()
    assert time.monotonic() - started < 20  # a new worker came without waiting for a stolen wake-up


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """A server with small per-run limits: 512 MB a process, 4 processes and threads, 200 MB of files."""
    with spawn_server(
        tmp_path_factory.mktemp("tight"),
        KEY,
        RLM_EXEC_TIMEOUT_S="20",
        RLM_WORKER_MEMORY_MB="512",
        RLM_WORKER_PROCESSES="4",
        RLM_WORKER_DISK_MB="200",
    ) as real:
        yield real


def test_a_runs_processes_are_capped_so_its_memory_is(tight: RealServer) -> None:
    """A cell forks up to 20 children that take 100 MB each. With RLM_WORKER_PROCESSES=4 at most four
    start, so the run's code holds at most 5 × RLM_WORKER_MEMORY_MB. Today a worker could start 256 (the
    issue: 20 children of a 512 MB worker held 3.9 GB). Mutant: `processes + 256` in `set_limits` → 20."""
    cell = """
import os, time
children, refused = [], None
for _ in range(20):
    try:
        pid = os.fork()
    except OSError as exc:
        refused = type(exc).__name__
        break
    if pid == 0:
        held = b'x' * 100_000_000
        time.sleep(60)
        os._exit(0)
    children.append(pid)
time.sleep(1)
rss = 0
for pid in [os.getpid(), *children]:
    with open(f'/proc/{pid}/status') as status:
        rss += next(int(line.split()[1]) for line in status if line.startswith('VmRSS'))
print(len(children), refused, rss // 1024)
"""
    events = tight.run(cell)
    count, refused, rss_mb = outputs(events)[0]["stdout"].split()
    assert int(count) <= 4 and refused == "BlockingIOError", outputs(events)[0]
    assert int(rss_mb) <= 5 * 512
    tight.assert_healthy()


def test_the_children_of_a_stopped_worker_leave_the_next_worker_its_processes(tight: RealServer) -> None:
    """A cell starts four children (RLM_WORKER_PROCESSES), the next runs past its time and the worker is stopped
    with them, and the cell after it starts four threads at once in the restarted worker, which runs as the same
    uid. Old behaviour caught (the attack pass): the killed children stayed zombies of the machine's first process
    until it got to them (2 s here), still counted against the uid's processes: "can't start new thread"."""
    start = "import subprocess\nkids = [subprocess.Popen(['sleep', '600']) for _ in range(4)]\nprint(len(kids))"
    threads = """
import threading
started = [threading.Thread(target=lambda: None) for _ in range(4)]
for thread in started:
    thread.start()
print('threads', len(started))
"""
    events = tight.run(start, "while True:\n    pass", threads, exec_timeout_s=3)
    first, second, third = outputs(events)[:3]
    assert first["stdout"] == "4\n" and "TimeoutError" in (second["error"] or "")
    assert third["stdout"] == "threads 4\n", third["error"]


def test_a_cell_that_fills_the_disk_is_stopped_and_its_files_go(tight: RealServer) -> None:
    """With RLM_WORKER_DISK_MB=200 a cell writes 50 MB files, 2 GB in all. The server walks the run's
    directory four times a second: past 200 MB it stops the worker, deletes the files and says why in the
    error of the cell it stopped (that one, or the next if the writer finished first); a run alongside goes
    on. Today nothing stopped it but a full disk (the issue: another run failed). Mutant: do not start
    `_watch_disk` → every cell succeeds and the files stay."""
    fill = """
block = b'x' * 50_000_000
for n in range(40):
    with open(f'part{n}.bin', 'wb') as f:
        f.write(block)
"""
    alongside: dict[str, list[SseEvent]] = {}
    other = threading.Thread(target=lambda: alongside.update(events=tight.run("print(len(context))")))
    other.start()
    events = tight.run(fill, "import time\ntime.sleep(2)", "import os\nprint(sorted(os.listdir('.')))")
    other.join(60)
    first, second, third = outputs(events)[:3]
    stopped = next(output["error"] for output in (first, second) if output["error"])
    assert "DiskLimit" in stopped and "RLM_WORKER_DISK_MB is 200 MB" in stopped and "deleted" in stopped, stopped
    assert third["stdout"] == "[]\n" and events[-1].event == "final"
    assert alongside["events"][-1].event == "final"
    assert outputs(alongside["events"])[0]["stdout"] == "9\n"
    tight.assert_healthy()


def test_files_nested_past_a_paths_length_do_not_escape_the_disk_cap(tight: RealServer) -> None:
    """A cell nests 17 directories of 250-character names (a path past 4,096 characters), then writes 400 MB
    beside them with RLM_WORKER_DISK_MB=200. The server's walk cannot list the deepest directory by its path: the
    worker is stopped for it and every file goes, the deep ones too. Old behaviour caught (the attack pass): the
    walk raised ENAMETOOLONG, which ended the run's disk watch for good, and the run wrote 1.8 GB past a 1 GB cap."""
    nest_and_fill = """
import os, time
fd = os.open('.', os.O_RDONLY)
for _ in range(17):
    os.mkdir('d' * 250, dir_fd=fd)
    deeper = os.open('d' * 250, os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = deeper
time.sleep(1)
block = b'x' * 50_000_000
for n in range(8):
    with open(f'part{n}.bin', 'wb') as f:
        f.write(block)
"""
    events = tight.run(nest_and_fill, "import time\ntime.sleep(2)", "import os\nprint(sorted(os.listdir('.')))")
    first, second, third = outputs(events)[:3]
    stopped = next((output["error"] for output in (first, second) if output["error"]), "")
    assert "DiskLimit" in stopped and "4,096 characters" in stopped and "deleted" in stopped, (first, second)
    assert third["stdout"] == "[]\n" and events[-1].event == "final"
    tight.assert_healthy()


def test_a_run_whose_files_nest_deeper_than_rmtree_recurses_leaves_none(server: RealServer) -> None:
    """A cell nests 1,500 directories (a 3,000-character path, which the disk walk lists). When the run ends its
    directory goes all the same. Old behaviour caught (the attack pass): shutil.rmtree recursed once a level and
    raised RecursionError, so the run's input and files stayed on disk after it (the next runs could leave as many,
    past every disk cap) and its uid was never given back."""
    nest = """
import os
fd = os.open('.', os.O_RDONLY)
for _ in range(1500):
    os.mkdir('d', dir_fd=fd)
    deeper = os.open('d', os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = deeper
print('nested')
"""
    assert server.tmp is not None
    events = server.run(nest)
    assert outputs(events)[0]["stdout"] == "nested\n" and events[-1].event == "final"
    assert wait_until(lambda: not list(server.tmp.glob("rlm-instance-*/run-*")), timeout=30)
    server.assert_healthy()


def test_one_file_cannot_pass_the_disk_cap(tight: RealServer) -> None:
    events = tight.run("open('big.bin', 'wb').write(b'x' * 300_000_000)")
    assert "File too large" in (outputs(events)[0]["error"] or ""), outputs(events)[0]
    tight.assert_healthy()


def test_an_answer_past_its_size_is_reported_cut_and_the_root_model_is_told(server: RealServer) -> None:
    """`answer['content']` of 5 Mi characters of control characters (whose JSON is six times as long): the run
    reports its first 4 Mi characters, the root model is told, and `/health` keeps answering. Mutant: no cap in
    the executor (the final answer has 5 Mi characters; serializing each event carrying it costs the event
    loop six times as much)."""
    seen = len(server.fake.stats.root_bodies)
    with health_watch(server) as health:
        events = server.run("answer['content'] = '\\x01' * (5 * 2**20)")
    assert events[-1].event == "final" and len(events[-1].data["answer"]) == 4 * 2**20
    told = json.dumps(server.fake.stats.root_bodies[seen:])
    assert "only the first 4,194,304 are reported" in told
    assert health.answers and health.slowest < 2.0, health


def test_the_replies_of_one_batch_are_bounded_together(server: RealServer) -> None:
    """The sub-model answers every call of an `llm_batch` of eight with 15 MiB, each under the 16 MiB cap of one
    reply. The batch's replies together stop at 64 MiB (llm.MAX_BATCH_REPLY_BYTES): four come whole, the rest
    are `Error:` strings that say why, and the server stays responsive. Old behaviour caught (the attack pass):
    nothing bounded the total; a batch of 120 such replies took the server to 4.6 GB and stalled /health for 25 s
    while it wrote them to the worker in one go. Here the old code gave the cell all eight."""
    server.fake.sub = lambda prompt: "y" * (15 * 2**20)
    try:
        events = server.run(
            "r = llm_batch(['p'] * 8)\n"
            "whole = sum(len(x) == 15 * 2**20 for x in r)\n"
            "dropped = [x for x in r if x.startswith('Error:')]\n"
            "print(whole, len(dropped), dropped[0] if dropped else '')"
        )
    finally:
        server.fake.sub = default_sub_reply
    printed = outputs(events)[0]["stdout"]
    dropped = "Error: the replies this run's batches hold passed 67,108,864 bytes together"
    assert printed.startswith(f"4 4 {dropped}"), printed[:300]
    assert events[-1].event == "final"
    server.assert_healthy()
