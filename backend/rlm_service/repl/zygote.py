"""The worker zygote: one long-lived process that forks REPL workers on request. Standard library only.

Starting a fresh interpreter and importing the worker's modules (and numpy, which most generated code
uses) costs about 100 ms of CPU per run; forking a process that has already done so costs about one.
The zygote runs no generated code itself: each forked child keeps only its standard streams and its
channel (every other descriptor of the zygote is closed) and confines itself (`sandbox`) before it reads
its first cell. The zygote is single-threaded, so forking it is safe, and not dumpable (nor are the
workers it forks), so no process of its uid can read or write its memory through /proc. When the server
goes away, the zygote kills every worker's process group (a worker's descendants cannot leave it) and exits.

Control channel (a SOCK_SEQPACKET socket: one datagram per message, file descriptors attached):
    server → zygote: {"op": "spawn", "id", "cwd", "env"} with two fds: the worker's channel socket and
                     the write end of a pipe for its stderr
    zygote → server: {"op": "spawned", "id", "pid", "started"} or {"op": "failed", "id", "error"};
                     {"op": "exited", "pid", "returncode"} for every worker that ends (negative: a signal)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

from .procstat import stat_fields

MAX_MESSAGE = 1024 * 1024


def _send(control: socket.socket, message: dict[str, object]) -> None:
    control.send(json.dumps(message).encode())


def _preload(modules: list[str]) -> None:
    """Import what every worker needs, and `modules` (numpy, matplotlib…), so children start with them."""
    import importlib

    from . import worker  # noqa: F401

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"rlm-zygote: could not preload {name}: {exc}", file=sys.stderr)


CHANNEL_FD = 3
"""Where a worker finds its channel: its only descriptor besides the standard streams."""
_live: set[int] = set()
"""Workers forked and not yet reaped."""


def _child(message: dict[str, object], fds: list[int], control: socket.socket, zygote: int) -> NoReturn:
    """Become a worker, and never return into the zygote's code: an exception there (the run's directory deleted
    by a run that was cancelled as its worker was forked, so `chdir` fails) would run the zygote's `finally` in
    this process, which kills the process group of every live worker, other runs' included."""
    status = 1
    try:
        _become_worker(message, fds, control, zygote)
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()  # to the worker's stderr once it is set up: the server shows its tail
            sys.stderr.flush()
    finally:
        os._exit(status)


def _become_worker(message: dict[str, object], fds: list[int], control: socket.socket, zygote: int) -> None:
    # First: the server kills a worker by its process group, which exists from here on. The worker stays in the
    # zygote's session, which has no terminal, and so shares its scheduling weight (`yield_cpu_to_the_server`).
    os.setpgid(0, 0)
    from . import sandbox, worker

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sandbox.set_process_name("rlm-worker")
    channel_fd, stderr_fd = fds
    control.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(stderr_fd, 2)
    if channel_fd != CHANNEL_FD:
        os.dup2(channel_fd, CHANNEL_FD)
    os.closerange(CHANNEL_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the wake-up pipe, stray descriptors: all
    os.chdir(str(message["cwd"]))
    os.environ.clear()
    environment = message["env"]
    assert isinstance(environment, dict)
    os.environ.update({str(k): str(v) for k, v in environment.items()})
    worker.main(CHANNEL_FD, expected_parent=zygote)


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), None if there is none: with the pid, which the kernel
    gives out again once it is free, it names one process for good."""
    fields = stat_fields(pid, 22)
    return fields[0] if fields is not None else None


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in _live:  # (the others: children of a worker that died, reaped as its subreaper)
            _live.discard(pid)
            _send(control, {"op": "exited", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _spawn(control: socket.socket, message: dict[str, object], fds: list[int]) -> None:
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        _send(control, {"op": "failed", "id": message.get("id"), "error": str(exc)})
    else:
        if pid == 0:
            _child(message, fds, control, zygote)
        _live.add(pid)
        _send(control, {"op": "spawned", "id": message.get("id"), "pid": pid, "started": start_time(pid)})
    for fd in fds:
        os.close(fd)


def _stop(*_: object) -> None:
    raise SystemExit(0)


def serve(control: socket.socket) -> None:
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, _stop)  # the server died (PDEATHSIG) or asked us to go
    try:
        while True:
            ready, _, _ = select.select([control.fileno(), wake_read], [], [])
            if wake_read in ready:
                try:
                    os.read(wake_read, 4096)
                except BlockingIOError:
                    pass
                _reap(control)
            if control.fileno() in ready:
                data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 2)
                if not data:
                    return  # the server is gone
                message = json.loads(data)
                if message.get("op") == "spawn" and len(fds) == 2:
                    _spawn(control, message, fds)
                else:
                    for fd in fds:
                        os.close(fd)
    finally:
        for pid in _live:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue


def main() -> None:
    from . import sandbox

    control = socket.socket(fileno=int(sys.argv[1]))
    server = int(sys.argv[2])
    sandbox.die_with_parent(server, signal.SIGTERM)
    # While its /proc files are still its own (non-dumpable: root's):
    sandbox.first_to_go_out_of_memory()
    sandbox.yield_cpu_to_the_server(server)
    sandbox.make_non_dumpable()
    sandbox.set_process_name("rlm-zygote")
    # The children a stopped worker leaves are the zygote's to reap, at once: reparented to the machine's first
    # process, they would stay zombies until it got to them, counted against the processes of the worker's uid,
    # which the next worker of the run uses.
    sandbox.become_subreaper()
    _preload(json.loads(sys.argv[3]) if len(sys.argv) > 3 else [])
    gc.collect()
    gc.freeze()  # the children's collections then leave the preloaded modules alone: no page copied for them
    _send(control, {"op": "ready", "pid": os.getpid()})
    serve(control)
