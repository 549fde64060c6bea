"""The worker's confinement at the unit level: the seccomp filter against the kernel, the channel's caps,
and the files and uids that server processes on one host share."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm_service.repl import protocol, workspace
from rlm_service.repl.syscalls import ARCH, SYSCALLS

BACKEND = str(Path(__file__).resolve().parents[1] / "backend")

ATTACKS = textwrap.dedent("""
    import ctypes, json, os, socket, struct, sys
    sys.path.insert(0, sys.argv[1])
    from rlm_service.repl import seccomp
    from rlm_service.repl.syscalls import ARCH, SYSCALLS
    victim, victim_thread, strict = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "strict"
    seccomp.apply_seccomp(network=False, protected_pids=[victim], strict_signals=strict)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    own, own_thread = os.getpid(), ctypes.CDLL(None).gettid()

    def call(name, *args):
        ctypes.set_errno(0)
        result = libc.syscall(SYSCALLS[ARCH][name], *args)
        return "ok" if result >= 0 else os.strerror(ctypes.get_errno())

    info = ctypes.create_string_buffer(128)
    struct.pack_into("iii", info, 0, 0, 0, -1)  # signal 0, SI_QUEUE: checks permission, delivers nothing
    limits = ctypes.create_string_buffer(16)
    mask = ctypes.create_string_buffer(128)
    libc.sched_getaffinity(0, 128, mask)
    handle, mount = ctypes.create_string_buffer(256), ctypes.c_int()
    pair = (ctypes.c_int * 2)()
    struct.pack_into("I", handle, 0, 128)
    kept = socket.socketpair()
    owned = kept[0].fileno()
    owner = ctypes.c_int(victim)
    results = {
        "fcntl F_SETOWN victim": call("fcntl", owned, 8, victim),
        "fcntl F_SETOWN_EX victim": call("fcntl", owned, 15, struct.pack("ii", 1, victim)),
        "ioctl FIOSETOWN victim": call("ioctl", owned, 0x8901, ctypes.byref(owner)),
        "ioctl SIOCSPGRP victim": call("ioctl", owned, 0x8902, ctypes.byref(owner)),
        "ok: fcntl F_GETFL": call("fcntl", owned, 3, 0),
        "kill victim": call("kill", victim, 0),
        "kill victim thread": call("kill", victim_thread, 0),
        "kill everyone": call("kill", -1, 0),
        "kill victim group": call("kill", -victim, 0),
        "tgkill victim": call("tgkill", victim, victim_thread, 0),
        "tkill victim thread": call("tkill", victim_thread, 0),
        "sigqueue victim": call("rt_sigqueueinfo", victim, 0, info),
        "sigqueue victim thread": call("rt_sigqueueinfo", victim_thread, 0, info),
        "tgsigqueue victim": call("rt_tgsigqueueinfo", victim, victim_thread, 0, info),
        "pidfd victim": call("pidfd_open", victim, 0),
        "pidfd victim thread": call("pidfd_open", victim_thread, os.O_EXCL),
        "pidfd_send_signal": call("pidfd_send_signal", 0, 0, None, 0),
        "pidfd_getfd": call("pidfd_getfd", 0, 0, 0),
        "prlimit victim": call("prlimit64", victim, 7, None, limits),
        "setpriority victim": call("setpriority", 0, victim, 0),
        "setpriority my uid": call("setpriority", 2, 0, 0),
        "affinity victim": call("sched_setaffinity", victim, 128, mask),
        "memfd_create": call("memfd_create", b"x", 0),
        "name_to_handle_at": call("name_to_handle_at", -100, b".", handle, ctypes.byref(mount), 0),
        "open_by_handle_at": call("open_by_handle_at", -100, handle, 0),
        "kcmp": call("kcmp", own, victim, 0, 0, 0),
        "socket": call("socket", 2, 1, 0),
        "datagram socketpair": call("socketpair", socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, pair),
        "raw socketpair": call("socketpair", socket.AF_UNIX, socket.SOCK_RAW, 0, pair),
        "inet socketpair": call("socketpair", socket.AF_INET, socket.SOCK_STREAM, 0, pair),
        "shmget": call("shmget", 0x524C4D, 4096, 0),  # no IPC_CREAT: without the filter, ENOENT, nothing made
        "shmat": call("shmat", 0, None, 0),
        "msgget": call("msgget", 0x524C4D, 0),
        "semget": call("semget", 0x524C4D, 1, 0),
        "mq_open": call("mq_open", b"rlm-no-such-queue", os.O_RDONLY, 0, None),
        "ok: kill own group": call("kill", 0, 0),
        "ok: kill self": call("kill", own, 0),
        "ok: kill own group by id": call("kill", -own, 0),
        "ok: tgkill own thread": call("tgkill", own, own_thread, 0),
        "ok: sigqueue self": call("rt_sigqueueinfo", own, 0, info),
        "ok: prlimit self": call("prlimit64", 0, 7, None, limits),
        "ok: setpriority self": call("setpriority", 0, 0, os.getpriority(os.PRIO_PROCESS, 0)),
        "ok: affinity self": call("sched_setaffinity", 0, 128, mask),
        "ok: socketpair": "ok" if socket.socketpair() else "no",
        "ok: seqpacket pair": call("socketpair", socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC, 0, pair),
    }
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def victim() -> Iterator[tuple[int, int]]:
    """A process of our uid with a second thread, standing in for the server: its pid and that thread's id."""
    code = (
        "import threading, time, sys\nready = threading.Event()\n"
        "t = threading.Thread(target=lambda: (ready.set(), time.sleep(120)), daemon=True)\nt.start()\n"
        "ready.wait()\nprint(t.native_id, flush=True)\ntime.sleep(120)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    thread = int(process.stdout.readline())
    yield process.pid, thread
    process.kill()
    process.wait()


def attack(victim: tuple[int, int], mode: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", ATTACKS, BACKEND, str(victim[0]), str(victim[1]), mode],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_worker_sharing_the_servers_uid_can_signal_only_its_own_processes(victim: tuple[int, int]) -> None:
    """Strict signals (a worker of the server's uid, no Landlock signal scope): every call that signals,
    or acts on, another process by pid or thread id is refused; the worker's own process, group and
    threads stay reachable. Today's filter let `rt_sigqueueinfo`, `rt_tgsigqueueinfo`, `kill` of a thread
    id, `prlimit64`, `setpriority` and `sched_setaffinity` through (the issue's SIGSTOP of the server);
    mutant: drop `strict_signals` in `build_seccomp_filter` → the thread-id and sigqueue rows say ok."""
    results = attack(victim, "strict")
    refused = {name: outcome for name, outcome in results.items() if not name.startswith("ok:")}
    assert all(outcome in ("Operation not permitted", "Permission denied") for outcome in refused.values()), refused
    assert all(outcome == "ok" for name, outcome in results.items() if name.startswith("ok:")), results


def test_a_worker_with_other_confinement_may_still_signal_its_children_but_never_the_server(
    victim: tuple[int, int],
) -> None:
    """Without strict signals (a worker with a uid of its own, or inside Landlock's signal scope, where the
    kernel keeps it from other processes) the filter still refuses the protected pids, every group but
    its own, and the calls that reach into another process. Mutant: drop the protected-pid rule of
    `rt_sigqueueinfo` → "sigqueue victim" says ok. System V IPC and POSIX message queues are refused too: their
    objects outlive the process (the attack pass: a run left 768 MB of shared memory segments in RAM after it
    ended, owned by no process, and could have gone on to fill the machine's memory); without that rule they
    say "No such file or directory" or "Invalid argument" here. So is a Unix datagram socket pair, with networking
    off (the attack pass sent the input to a named datagram socket of the host, sendto and connect alike); the
    stream and seqpacket pairs asyncio and multiprocessing make stay allowed."""
    results = attack(victim, "loose")
    for name in (
        "kill victim",
        "kill everyone",
        "kill victim group",
        "tgkill victim",
        "tkill victim thread",
        "sigqueue victim",
        "tgsigqueue victim",
        "pidfd victim",
        "pidfd_send_signal",
        "pidfd_getfd",
        "prlimit victim",
        "setpriority victim",
        "setpriority my uid",
        "affinity victim",
        "memfd_create",
        "name_to_handle_at",
        "open_by_handle_at",
        "kcmp",
        "socket",
        "datagram socketpair",
        "raw socketpair",
        "inet socketpair",
        "shmget",
        "shmat",
        "msgget",
        "semget",
        "mq_open",
        "fcntl F_SETOWN victim",
        "fcntl F_SETOWN_EX victim",
        "ioctl FIOSETOWN victim",
        "ioctl SIOCSPGRP victim",
    ):
        assert results[name] in ("Operation not permitted", "Permission denied"), (name, results[name])
    assert results["kill victim thread"] == "ok"  # the kernel, not this filter, stops that in this mode
    assert results["pidfd victim thread"] == "ok"
    assert all(outcome == "ok" for name, outcome in results.items() if name.startswith("ok:")), results


def test_syscall_numbers_match_libseccomp() -> None:
    """The hand-written tables agree with libseccomp's, for both architectures we ship on (pyseccomp, a test
    dependency, reads them from Debian's libseccomp2, which .ci/run installs)."""
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # the library itself missing: ctypes raises either
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"needs libseccomp (apt-get install libseccomp2): {exc}")
    arches = {"x86_64": pyseccomp.Arch.X86_64, "aarch64": pyseccomp.Arch.AARCH64}
    for arch, numbers in SYSCALLS.items():
        for name, number in numbers.items():
            assert pyseccomp.resolve_syscall(arches[arch], name) == number, (arch, name)


def test_the_filter_covers_every_denied_call_on_this_architecture() -> None:
    from rlm_service.repl.seccomp import DENIED, ON_SELF_ONLY, SIGNAL_OWNERS, SIGNALS

    missing = [
        name
        for name in (*SIGNALS, *ON_SELF_ONLY, *SIGNAL_OWNERS, "pidfd_open", "clone", "clone3")
        if name not in SYSCALLS[ARCH]
    ]
    assert not missing
    assert len([name for name in DENIED if name in SYSCALLS[ARCH]]) >= len(DENIED) - 4  # x86-only calls


# --- the channel ------------------------------------------------------------------------------------


def read(data: bytes, reserved: list[int] | None = None) -> protocol.Message:
    async def main() -> protocol.Message:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()

        async def reserve(head: dict[str, Any], size: int) -> int:
            if reserved is not None:
                reserved.append(size)
            return size

        return await protocol.read_message(reader, reserve)

    return asyncio.run(main())


def test_a_message_carries_texts_as_raw_utf8() -> None:
    texts = ["plain", "", None, "héllo → 😀", "x" * 100_000]
    reserved: list[int] = []
    message = read(b"".join(protocol.encode({"op": "batch", "id": 7}, texts)), reserved)
    assert message.head == {"op": "batch", "id": 7} and message.texts == texts
    assert reserved == [sum(len(t.encode()) for t in texts if t is not None)]


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (protocol.FRAME.pack(protocol.MAX_HEAD_BYTES + 1, 0), "message head of"),
        (protocol.FRAME.pack(2, protocol.MAX_TEXTS + 1), "texts"),
        (protocol.FRAME.pack(2, 1) + b"{}" + protocol.LENGTH.pack(0), "without an op"),
        (protocol.FRAME.pack(5000, 0) + b"[" * 5000, "not JSON"),
        (protocol.FRAME.pack(10, 1) + b'{"op":"x"}' + protocol.LENGTH.pack(protocol.MAX_TEXT_BYTES + 1), "a text of"),
        (
            protocol.FRAME.pack(10, 5) + b'{"op":"x"}' + protocol.LENGTH.pack(protocol.MAX_TEXT_BYTES) * 5,
            "a message of",
        ),
    ],
)
def test_the_server_refuses_what_passes_the_caps_before_reading_it(frame: bytes, problem: str) -> None:
    """Each length is checked before what it announces is read (a nested head too deep to parse is refused,
    not a crash). Mutant: skip `check_lengths` → the last two read on (and fail only at the end of input)."""
    with pytest.raises(protocol.ProtocolError, match=problem):
        read(frame)


def test_an_incomplete_message_means_the_worker_is_gone() -> None:
    whole = b"".join(protocol.encode({"op": "done"}, ["abc"]))
    with pytest.raises(protocol.ChannelClosed):
        read(whole[:-1])


def test_fit_cuts_on_a_character_boundary() -> None:
    assert protocol.fit("é" * 10, 5) == ("é" * 2).encode()
    assert protocol.fit("abc", 10) == b"abc"


# --- files and uids shared by the server processes of a host -----------------------------------------

HOLD = textwrap.dedent("""
    import sys, tempfile, time
    sys.path.insert(0, sys.argv[1])
    tempfile.tempdir = sys.argv[2]
    from rlm_service.repl import workspace
    directory = workspace.instance_directory()
    (directory / "input.txt").write_text("secret input")
    uid = workspace.UID_POOL.take() if sys.argv[3] == "uid" else None
    print(directory, uid, flush=True)
    time.sleep(120)
""")


def hold(tmp: Path, what: str = "dir") -> tuple[subprocess.Popen[str], Path, int | None]:
    """Another server process (as far as the files go): it takes its directory (and a uid) and waits."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, BACKEND, str(tmp), what], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    directory, uid = process.stdout.readline().split()
    return process, Path(directory), None if uid == "None" else int(uid)


def test_stale_run_files_of_dead_processes_go_and_live_ones_stay(tmp_path: Path) -> None:
    """Today's run files had no owner: after kill -9 they stayed for ever. Mutant: skip the flock test in
    `remove_stale_instances` → the live process's directory is removed too."""
    alive, alive_dir, _ = hold(tmp_path)
    dead, dead_dir, _ = hold(tmp_path)
    dead.kill()
    dead.wait()
    try:
        removed = workspace.remove_stale_instances(tmp_path)
        assert removed == [dead_dir] and not dead_dir.exists()
        assert (alive_dir / "input.txt").read_text() == "secret input"
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="worker uids are given out only by a server running as root")
def test_two_server_processes_never_get_the_same_worker_uid(tmp_path: Path) -> None:
    """Today each process counted uids from the same start on its own: both got 61000. Mutant: ignore the
    flock in `_UidPool._lock_uid` → the same uid twice."""
    other, _, theirs = hold(tmp_path, "uid")
    try:
        mine = workspace.UID_POOL.take()
        try:
            assert theirs is not None and mine != theirs
        finally:
            workspace.UID_POOL.give_back(mine)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return next(line.split()[1] for line in status if line.startswith("State:"))


@pytest.mark.skipif(os.geteuid() != 0, reason="worker uids are given out only by a server running as root")
@pytest.mark.parametrize("left_over", ["running", "zombie"])
def test_a_uid_a_process_still_has_is_not_given_out(left_over: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process left over as a run's uid (still running, or ended and not yet reaped: a zombie still counts
    against its uid's process limit) keeps the next runs from that uid, also those that take it after the one
    that found it in use. The pool draws from the top of the range, where the other servers of this host
    (other test sessions) do not reach. Mutants: drop the in-use check in `_UidPool.take` → the next run gets
    that uid; leave zombies out of `_processes_by_uid` → it does in the zombie case."""
    monkeypatch.setattr(workspace, "_UID_BASE", workspace._UID_BASE + workspace._UID_COUNT - 50)
    monkeypatch.setattr(workspace, "_UID_COUNT", 50)
    pool = workspace._UidPool()
    uid = pool.take()
    pool.give_back(uid)
    process = subprocess.Popen(["sleep", "60"] if left_over == "running" else ["true"], user=uid, group=uid)
    try:
        if left_over == "zombie":
            for _ in range(1000):
                if _state(process.pid) == "Z":
                    break
                time.sleep(0.01)
            assert _state(process.pid) == "Z"
        taken = [pool.take() for _ in range(3)]
        try:
            assert uid not in taken
        finally:
            for other in taken:
                pool.give_back(other)
    finally:
        process.kill()
        process.wait()
