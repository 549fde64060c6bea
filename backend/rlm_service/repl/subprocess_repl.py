"""`RLM_REPL=subprocess`: each run's code runs in its own confined worker process on this machine.

The zygote forks the worker with an empty environment (an allow-list, not a copy of ours), in the run's
working directory, in a process group of its own so that killing the group takes every child along; the
worker confines itself (`sandbox`) before it reads its first cell. The run's disk use is watched, and a
run whose files pass RLM_WORKER_DISK_MB has its worker stopped. Everything else a worker REPL does (the
channel, serving sub-calls, restarts) is `worker_repl.WorkerRepl`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import protocol
from .base import Repl, ReplError, ReplOptions, register
from .spawner import BASE_ENVIRONMENT, SpawnError, WorkerProcess, Zygote
from .worker_repl import Stop, Worker, WorkerRepl
from .workspace import Workspace, kill_uid
from .zygote import start_time

log = logging.getLogger("rlm_service")

MAX_FILE_BYTES = 1024**3
"""The largest file a worker may write (RLIMIT_FSIZE), when the run's disk cap is not smaller."""
DISK_CHECK_S = 0.25


def worker_environment(workdir: Path) -> dict[str, str]:
    """The whole environment of a worker: the zygote's allow-list and its own directory, nothing else."""
    return {
        **BASE_ENVIRONMENT,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "PYTHONIOENCODING": "utf-8",
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
    }


_reported: list[bool] = []


def _report_sandbox_once(layers: list[str], skipped: dict[str, str]) -> None:
    """Log, once per server process, which confinement layers the workers get on this machine."""
    if _reported:
        return
    _reported.append(True)
    log.info("REPL workers are confined by: %s", ", ".join(layers) or "nothing")
    for layer, reason in skipped.items():
        log.warning("REPL sandbox layer %s is unavailable here: %s", layer, reason)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "the worker process stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal, which has no name of its own
            name = ""
        hint = " (most often: it ran out of memory or hit a process limit)" if returncode == -signal.SIGKILL else ""
        return f"the worker process was killed by signal {-returncode} {name}{hint}".replace("  ", " ")
    return f"the worker process exited with status {returncode}"


class _Process:
    """One worker forked by the zygote: its end of the channel, its process group, its stderr."""

    def __init__(
        self,
        process: WorkerProcess,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stderr_tail: deque[bytes],
        stderr_drain: asyncio.Future[None],
        uid: int | None,
    ) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.stderr_tail = stderr_tail
        self.stderr_drain = stderr_drain
        self.uid = uid
        self.layers: list[str] = []

    def kill(self) -> None:
        """SIGKILL the worker's whole process group. Where seccomp did not pin its descendants to that
        group (they could setsid away), also every process of its private uid, if it has one."""
        _kill(self.process)
        if self.uid is not None and not any(layer.startswith("seccomp") for layer in self.layers):
            kill_uid(self.uid)
        self.writer.close()

    async def reap(self) -> None:
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(2):
                await self.process.wait()

    async def ended(self) -> None:
        await self.process.wait()

    def describe_exit(self) -> str:
        return _describe_exit(self.process.returncode)

    def killed_by_memory(self) -> bool:
        return self.process.returncode == -signal.SIGKILL

    async def stderr_text(self) -> str:
        """The end of what the worker wrote to stderr, once it has all been read (the pipe still holds its last
        lines when its exit is known), or after two seconds if something else holds the pipe open."""
        await asyncio.wait({self.stderr_drain}, timeout=2)
        return b"".join(self.stderr_tail).decode("utf-8", "replace").strip()[-2000:]


def _kill(process: WorkerProcess) -> None:
    """SIGKILL a worker's process group; a worker forked an instant ago has no group of its own yet, and is
    killed by its pid (which the zygote has not reaped, as it has not reported it dead)."""
    if process.started is not None and start_time(process.pid) not in (None, process.started):
        # The worker ended and was reaped (a session's worker, killed while the session was idle, say), and its pid
        # is another process's now (pids wrap around; one is given out again only once no process is left in the
        # group it names): that group, another run's worker or any process of the host's, is not this one's.
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)
    except PermissionError:
        pass


STDERR_BURST_BYTES = 64 * 1024
STDERR_PAUSE_S = 0.01
"""After each STDERR_BURST_BYTES of a worker's stderr, its reading waits this long: a worker's stderr is read
at 6.5 MB/s at most, and one that writes to it without end waits for the pipe rather than keep the event loop
every run shares busy reading."""


async def _drain_stderr(fd: int, tail: deque[bytes]) -> None:
    """Keep the last few kilobytes a worker wrote to its stderr, for the error if it crashes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            with contextlib.suppress(Exception):
                burst = 0
                while chunk := await reader.read(4096):
                    tail.append(chunk)
                    burst += len(chunk)
                    if burst >= STDERR_BURST_BYTES:
                        burst = 0
                        await asyncio.sleep(STDERR_PAUSE_S)
        finally:
            transport.close()


class ZygoteLauncher:
    """Starts a run's workers from the zygote, in the run's workspace, and watches the run's disk use."""

    def __init__(self, zygote: Zygote, workspace: Workspace, options: ReplOptions) -> None:
        self.zygote = zygote
        self.workspace = workspace
        self.options = options
        self._drains: set[asyncio.Task[None]] = set()

    async def launch(self, init: dict[str, Any], answer: str) -> tuple[Worker, dict[str, Any]]:
        workspace = self.workspace
        try:
            process = await self.zygote.spawn(workspace.workdir, worker_environment(workspace.workdir))
        except SpawnError as exc:
            raise ReplError(str(exc)) from exc
        try:
            reader, writer = await asyncio.open_unix_connection(sock=process.channel)
        except BaseException:  # cancelled, most likely: the worker must not outlive the run that asked for it
            _kill(process)
            process.channel.close()
            os.close(process.stderr)
            raise
        tail: deque[bytes] = deque(maxlen=16)
        drain = asyncio.ensure_future(_drain_stderr(process.stderr, tail))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        worker = _Process(process, reader, writer, tail, drain, workspace.worker_uid)
        size = workspace.input_path.stat().st_size
        writer.writelines(
            protocol.encode(
                {
                    **init,
                    "input_path": str(workspace.input_path),
                    "uid": workspace.worker_uid,
                    "server_pid": os.getpid(),
                    "max_file_bytes": min(self.options.disk_mb * 1024 * 1024, MAX_FILE_BYTES),
                },
                [answer],
            )
        )
        try:
            await writer.drain()
            async with asyncio.timeout(30 + size / 50e6):
                ready = await protocol.read_message(reader, _nothing_held)
        except (protocol.ChannelClosed, protocol.ProtocolError, ConnectionError, TimeoutError) as exc:
            worker.kill()
            await worker.reap()
            detail = await worker.stderr_text()
            raise ReplError(
                f"the REPL worker did not start: {worker.describe_exit()}" + (f": {detail}" if detail else "")
            ) from exc
        except asyncio.CancelledError:  # the run was cancelled while its worker started
            worker.kill()
            raise
        if ready.op != "ready":
            worker.kill()
            await worker.reap()
            raise ReplError(f"the REPL worker did not start: {str(ready.head.get('error', ready.op))[:2000]}")
        worker.layers = [str(layer) for layer in _as_list(ready.head.get("layers"))[:20]]
        skipped = ready.head.get("skipped")
        _report_sandbox_once(
            worker.layers, {str(k): str(v) for k, v in list(skipped.items())[:20]} if isinstance(skipped, dict) else {}
        )
        return worker, ready.head

    async def watch(self, stop: Stop) -> None:
        """Stop the worker when the run's files pass `disk_mb`, and delete them. The directory is walked
        every quarter second (less often when a walk takes long), so a fast writer can pass the cap by
        what it writes in between; one file cannot pass it (RLIMIT_FSIZE)."""
        limit = self.options.disk_mb * 1024 * 1024
        try:
            while True:
                started = time.monotonic()
                problem = await asyncio.to_thread(self.workspace.over_disk_limit, limit)
                if problem is not None:
                    log.warning("run directory %s: %s; worker stopped", self.workspace.root, problem)
                    await stop(
                        f"DiskLimit: the run's files {problem} (RLM_WORKER_DISK_MB is "
                        f"{self.options.disk_mb:,} MB); the worker was stopped and every file in its "
                        "directory deleted."
                    )
                    await asyncio.to_thread(self.workspace.empty_workdir)
                await asyncio.sleep(max(DISK_CHECK_S, 4 * (time.monotonic() - started)))
        finally:
            for drain in list(self._drains):
                drain.cancel()


async def _nothing_held(head: dict[str, Any], size: int) -> int:
    return 0


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class SubprocessBackend:
    """`RLM_REPL=subprocess`: one zygote per engine; each REPL's worker is forked from it."""

    isolates_uid = True
    keeps_off_network = True

    def __init__(self, preload: list[str]) -> None:
        self.zygote = Zygote(preload)

    async def start(self) -> None:
        try:
            await self.zygote.start()
        except SpawnError as exc:  # runs will try again, and fail with a clear error if it persists
            log.warning("the REPL worker zygote did not start: %s", exc)

    def make(self, workspace: Workspace, options: ReplOptions) -> Repl:
        return WorkerRepl(ZygoteLauncher(self.zygote, workspace, options), options)

    async def close(self) -> None:
        await self.zygote.close()


register("subprocess")(SubprocessBackend)
