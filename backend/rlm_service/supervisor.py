"""Serving one instance with several processes on one port (`WEB_CONCURRENCY` > 1).

The supervisor reads the settings, hardens itself (the key leaves its environment), takes the port and
forks the server processes, which inherit the settings from its memory rather than an environment
that would carry the key. Each process runs its own event loop, engine and workers on a listening socket
of its own on that port (`SO_REUSEPORT`), and the kernel spreads connections among them by their addresses.
A process binds its socket at once but listens only once its startup is done (uvicorn listens after the
app's lifespan has started): a socket that listened earlier would be given its share of the connections
while the process starts, which then wait for it, and are reset if its startup fails (a database that
cannot be reached makes a restarted process fail again and again, and each attempt would take and drop
connections that the processes already serving could have answered).
One socket shared by all would not spread a burst: the first process to wake accepts every connection
waiting (asyncio accepts up to its backlog at once), and B7 measured all 32 runs of a burst on one
process. The supervisor holds the port with a socket that is bound but does not listen, so that no other
program takes it while a process restarts. The run and session counts of every
process live in shared memory made before the fork (`capacity`), so the instance's limits hold as a
whole. A process that dies is started again; its runs end for their followers as `lost` (every process
notices through the shared history), and its counts are zeroed. A supervisor that dies (killed, out of memory)
takes its processes with it: each gets SIGTERM and stops as on a clean stop (an orphan would go on serving the
port unsupervised, and a new instance started on the port would serve beside it with limits of its own).

Processes are forked, not spawned: a spawned interpreter would need the key in its environment or its
arguments, where other processes of the machine could read it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from types import FrameType

from .capacity import SharedCapacity, zero
from .config import Settings
from .repl.sandbox import die_with_parent

log = logging.getLogger("rlm_service")
RESTART_DELAY_S = 1.0
BACKLOG = 2048


def serve_processes(settings: Settings, count: int) -> None:
    """Serve on HOST:PORT with `count` processes until SIGTERM or SIGINT; restart any that dies."""
    try:
        holder = _reserve(settings.host, settings.port)
    except OSError as exc:  # a port in use, a HOST that is no address
        from .server import refuse_address

        refuse_address(settings, exc)
    address = (settings.host, holder.getsockname()[1])
    runs = multiprocessing.RawArray("i", count)  # no lock: see `capacity`
    sessions = multiprocessing.RawArray("i", count)
    children: dict[int, int] = {}
    stopping = False

    def start(index: int) -> None:
        supervisor = os.getpid()
        # Blocked across the fork, so that the new process never runs the supervisor's handlers (which would
        # signal its copy of `children`) before it has set its own.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    die_with_parent(supervisor, signal.SIGTERM)
                    holder.close()
                    listener = _reserve(*address)  # listens once the process is ready (uvicorn's startup)
                    _serve_one(
                        settings,
                        listener,
                        SharedCapacity(settings.rlm_max_concurrent_runs, runs, index),
                        SharedCapacity(settings.rlm_max_sessions, sessions, index),
                    )
                    code = 0
                finally:
                    os._exit(code)
            children[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        zero(runs, index)
        zero(sessions, index)
        if not stopping:
            log.error("server process %d ended (%s); starting another", pid, _describe(status))
            time.sleep(RESTART_DELAY_S)
            if not stopping:
                start(index)
    holder.close()


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to the port, not listening (`SO_REUSEPORT`): the supervisor's holds the port for the
    server processes' own sockets (raises when another program has it); a server process's listens when
    the process is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise
    return holder


def _serve_one(settings: Settings, listener: socket.socket, runs: SharedCapacity, sessions: SharedCapacity) -> None:
    """One server process: its app on its socket of the port, until the supervisor stops it."""
    from .server import build_app, run_uvicorn

    app = build_app(settings, runs=runs, sessions=sessions)
    run_uvicorn(app, settings, sockets=[listener], backlog=BACKLOG)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
