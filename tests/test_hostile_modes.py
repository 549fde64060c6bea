"""Hostile generated code against servers whose workers get fewer layers than this machine offers.

`RLM_WORKER_LANDLOCK=off` gives workers what kernels without Landlock give them; a server started as
an unprivileged uid gives them what the Docker image does (the server's own uid). Together: Docker on
an older kernel, where only seccomp stands between a worker and the server.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, ROOT_MODEL, SUB_MODEL, RealServer, answers_health, free_port, spawn_server, wait_until
from tests.fake_openai import FakeOpenAI
from tests.test_hostile import KEY, cells_yield_the_cpu, outputs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts servers as other users")


def _python_for_others() -> str | None:
    """An interpreter of our version that other users can run (ours may live under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if (
            candidate
            and all(os.stat(parent).st_mode & 0o001 for parent in Path(candidate).parents)
            and os.stat(candidate).st_mode & 0o001
        ):
            return candidate
    return None


def _free_uid() -> int:
    """A uid no user of this host has and no process runs as, drawn at random from a million, so that two copies
    of the suite running at once do not pick the same one (its process limit counts every task of the uid)."""
    for _ in range(100):
        uid = random.randrange(1_000_000, 2_000_000)
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        if not any(f"Uid:\t{uid}\t" in _status(pid) for pid in os.listdir("/proc") if pid.isdigit()):
            return uid
    raise RuntimeError("no free uid")


def _status(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


@contextmanager
def spawn_unprivileged_server(**env_overrides: str) -> Iterator[RealServer]:
    """`python backend/main.py` as a fresh unprivileged uid, in a directory of its own."""
    python = _python_for_others()
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user can run")
    uid = _free_uid()
    home = Path(tempfile.mkdtemp(prefix="rlm-test-user-"))
    (home / "tmp").mkdir()
    (home / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    for path in (home, home / "tmp", home / ".env"):
        os.chown(path, uid, uid)
    fake = FakeOpenAI().start()
    port = free_port()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "OPENAI_API_KEY": KEY,
        "OPENAI_API_BASE": fake.url,
        "OPENAI_MODEL_NAME": ROOT_MODEL,
        "OPENAI_SUB_MODEL_NAME": SUB_MODEL,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "RLM_LOG_LEVEL": "warning",
        "RLM_WORKER_PRELOAD": "",
        "RLM_HISTORY_DB": str(home / "history.sqlite3"),
        **env_overrides,
    }
    process = subprocess.Popen(
        [python, str(REPO / "backend" / "main.py")],
        cwd=home,
        env=env,
        user=uid,
        group=uid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until(lambda: answers_health(url), timeout=30):
            raise RuntimeError("the unprivileged server did not start")
        yield RealServer(url, process, fake, home)
    finally:
        os.kill(process.pid, signal.SIGCONT)  # in case an attack stopped it
        process.terminate()
        process.wait(10)
        fake.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def docker_on_an_old_kernel() -> Iterator[RealServer]:
    with spawn_unprivileged_server(RLM_WORKER_LANDLOCK="off", RLM_EXEC_TIMEOUT_S="20") as server:
        yield server


SIGNAL_THE_SERVER = """
import ctypes, fcntl, os, platform, signal, socket, struct
NUMBERS = {'x86_64': dict(kill=62, tgkill=234, tkill=200, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_open=434,
                          prlimit64=302, setpriority=141, sched_setaffinity=203),
           'aarch64': dict(kill=129, tgkill=131, tkill=130, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
                           pidfd_open=434, prlimit64=261, setpriority=140, sched_setaffinity=122)}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
zygote = os.getppid()
with open(f'/proc/{zygote}/stat') as stat:
    server = int(stat.read().rsplit(')', 1)[1].split()[1])
thread = next(int(t) for t in os.listdir(f'/proc/{server}/task') if int(t) != server)

def call(name, *args):
    return 'SENT' if libc.syscall(NUMBERS[name], *args) >= 0 else os.strerror(ctypes.get_errno())

def attempt(fn):
    try:
        fn()
        return 'SENT'
    except OSError as exc:
        return exc.strerror

def sigio(pid, own):
    # the kernel signals a descriptor's owner itself (SIGIO: deadly) when it becomes ready
    a, b = socket.socketpair()
    own(a, pid)
    fcntl.fcntl(a, fcntl.F_SETFL, fcntl.fcntl(a, fcntl.F_GETFL) | os.O_ASYNC)
    b.send(b'x')

by_fcntl = lambda a, pid: fcntl.fcntl(a, fcntl.F_SETOWN, pid)
by_ioctl = lambda a, pid: fcntl.ioctl(a, 0x8901, struct.pack('i', pid))  # FIOSETOWN
probe = ctypes.create_string_buffer(128)
struct.pack_into('iii', probe, 0, 0, 0, -1)  # signal 0 (permission only), SI_QUEUE
stop = ctypes.create_string_buffer(128)
struct.pack_into('iii', stop, 0, signal.SIGSTOP, 0, -1)
limits = ctypes.create_string_buffer(16)
mask = ctypes.create_string_buffer(128)
libc.sched_getaffinity(0, 128, mask)
results = {
    'kill a server thread': call('kill', thread, 0),
    'tgkill a server thread': call('tgkill', server, thread, 0),
    'tkill a server thread': call('tkill', thread, 0),
    'sigqueue a server thread': call('rt_sigqueueinfo', thread, 0, probe),
    'tgsigqueue a server thread': call('rt_tgsigqueueinfo', server, thread, 0, probe),
    'pidfd of a server thread': call('pidfd_open', thread, os.O_EXCL),
    'kill the zygote': call('kill', zygote, 0),
    'sigqueue the zygote': call('rt_sigqueueinfo', zygote, 0, probe),
    'read the server limits': call('prlimit64', server, 4, None, limits),
    'renice the server': call('setpriority', 0, server, os.getpriority(os.PRIO_PROCESS, 0)),
    'renice every process of my uid': call('setpriority', 2, 0, os.getpriority(os.PRIO_PROCESS, 0)),
    'pin the server': call('sched_setaffinity', server, 128, mask),
    'open the zygote memory': attempt(lambda: open(f'/proc/{zygote}/mem', 'r+b')),
    'open the server memory': attempt(lambda: open(f'/proc/{server}/mem', 'rb')),
    'SIGSTOP the server by sigqueue': call('rt_sigqueueinfo', server, signal.SIGSTOP, stop),
    'SIGIO the server as a socket owner': attempt(lambda: sigio(server, by_fcntl)),
    'SIGIO the zygote as a socket owner': attempt(lambda: sigio(zygote, by_ioctl)),
}
print(json.dumps(results))
"""


def test_a_worker_of_the_servers_uid_cannot_signal_or_reach_the_server(docker_on_an_old_kernel: RealServer) -> None:
    """The issue's attacks, in the mode where nothing but seccomp and non-dumpable processes protect the
    server: a worker of the server's uid, without Landlock. Every signal to a thread of the server or to
    the zygote, every call that acts on the server by pid, and every open of the server's or the zygote's
    memory is refused, and a real SIGSTOP by rt_sigqueueinfo leaves the server answering. Today's filter
    checked `kill` against the server's pid only: `rt_sigqueueinfo(server, SIGSTOP)` stopped it. Mutants:
    `strict_signals=False` in `sandbox.apply` → the signal rows say SENT and the server stops; drop
    `make_non_dumpable` in the zygote → "open the zygote memory" says SENT; no `SIGNAL_OWNERS` rule in
    seccomp → the kernel's SIGIO to a socket's owner ends the server (the attack pass found it)."""
    server = docker_on_an_old_kernel
    events = server.run("import json\n" + SIGNAL_THE_SERVER)
    output = outputs(events)[0]
    assert output["error"] is None, output["error"]
    results = json.loads(output["stdout"])
    assert [name for name, outcome in results.items() if outcome == "SENT"] == [], results
    server.assert_healthy()


def test_a_worker_of_the_servers_uid_gets_the_process_cap_too(docker_on_an_old_kernel: RealServer) -> None:
    """Sharing a uid, RLIMIT_NPROC counts the server's tasks too: the worker's cap is the uid's count at
    its start plus RLM_WORKER_PROCESSES (8) and its channel thread, so a fork bomb stops after at most 8
    (fewer if the server started threads since). Mutant: `processes + 256` → 20 children start."""
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
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(len(children), refused)
"""
    events = docker_on_an_old_kernel.run(cell)
    count, refused = outputs(events)[0]["stdout"].split()
    assert int(count) <= 8 and refused == "BlockingIOError"
    docker_on_an_old_kernel.assert_healthy()


def test_a_worker_of_the_servers_uid_cannot_take_back_the_cpu_it_yields(docker_on_an_old_kernel: RealServer) -> None:
    """Sharing the server's uid, without Landlock, a cell still runs below the server's priority and cannot
    raise its niceness or its group's weight: its /proc files are root's (it is not dumpable), and lowering a
    niceness needs a privilege it does not have. A program it starts is dumpable and can set the group's weight
    back to the default (SECURITY.md says so): not asserted either way here."""
    cells_yield_the_cpu(docker_on_an_old_kernel)


def test_without_landlock_a_worker_keeps_no_capability(tmp_path: Path) -> None:
    """A root server whose workers get no Landlock (RLM_WORKER_LANDLOCK=off): CAP_DAC_READ_SEARCH, kept
    where the Python installation is not world-readable, would let a worker read /etc/shadow, the
    server's .env and other runs' files. Without Landlock it goes: the worker either runs with no
    capability at all, or (where it then cannot read the installation, as under /root here) refuses to
    start with a message saying why. Mutant: keep the capability whatever Landlock did (drop the
    `unreadable and not landlocked` branch in `sandbox.apply`) → the cell reads /etc/shadow."""
    shadow = Path("/etc/shadow").read_text().splitlines()[0]
    cell = """
def read(path):
    try:
        return open(path).read()[:200]
    except OSError as exc:
        return 'DENIED ' + type(exc).__name__
capabilities = [line for line in open('/proc/self/status') if line.startswith('CapEff')]
print(capabilities, read('/etc/shadow'), read(SERVER_ENV))
""".replace("SERVER_ENV", repr(str(tmp_path / ".env")))
    with spawn_server(tmp_path, KEY, RLM_WORKER_LANDLOCK="off") as server:
        events = server.run(cell)
        text = json.dumps([event.data for event in events])
        assert shadow not in text and KEY not in text
        if events[-1].event == "error":
            assert "CAP_DAC_READ_SEARCH" in events[-1].data["message"]
            assert "Landlock is turned off" in events[-1].data["message"]
        else:
            printed = outputs(events)[0]["stdout"]
            assert "CapEff:\\t0000000000000000" in printed and printed.count("DENIED") == 2, printed
        assert server.process.poll() is None
