"""The server's side of the worker zygote (`zygote.py`): start it, ask it for workers, hear of their exits.

One `Zygote` per engine. It starts on first use, from an environment built here (never the server's),
in a session of its own, and goes with the server, taking the workers along. If it dies, the next spawn
starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("rlm_service")

_BACKEND_DIR = str(Path(__file__).resolve().parents[2])
# The zygote's Python runs isolated (-I: no PYTHONPATH, no user site, no current directory on its path), so
# nothing in the environment or the working directory can put a module before ours; the one directory it needs
# (this package's, when the service runs from a checkout rather than installed) is put on its path by hand.
_BOOT = "import sys; sys.path.insert(0, {path!r}); from rlm_service.repl.zygote import main; del sys.path[0]; main()"
BASE_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "MPLBACKEND": "Agg",
}
"""The zygote's whole environment (built here, never copied from the server's); workers add to it."""


class SpawnError(Exception):
    """No worker could be started."""


@dataclass
class WorkerProcess:
    """A worker forked by the zygote: its pid, its end of the channel, its stderr, its exit."""

    pid: int
    channel: socket.socket
    stderr: int
    exited: asyncio.Future[int] = field(repr=False)
    started: int | None = None
    """When it started (`zygote.start_time`), as the zygote saw it before it could end: its pid may be another
    process's once it has ended and been reaped."""

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


class Zygote:
    """Forks REPL workers from a pre-loaded process: a millisecond instead of a fresh interpreter."""

    def __init__(self, preload: list[str] | None = None) -> None:
        self.preload = list(preload or [])
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._starting: asyncio.Lock | None = None
        self._sending = asyncio.Lock()

    async def start(self) -> None:
        """Start the zygote now rather than at the first spawn."""
        await self._ensure_running()

    async def spawn(self, cwd: Path, env: dict[str, str]) -> WorkerProcess:
        await self._ensure_running()
        assert self._control is not None and self._loop is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stderr_read, stderr_write = os.pipe()
        request_id = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[request_id] = reply
        message = json.dumps({"op": "spawn", "id": request_id, "cwd": str(cwd), "env": env}).encode()
        try:
            async with asyncio.timeout(30):  # (not `wait_for`, which in 3.11 can swallow a cancellation)
                await self._send(message, [child_end.fileno(), stderr_write], reply)
                answer = await reply
        except BaseException:
            parent_end.close()
            os.close(stderr_read)
            raise
        finally:
            self._pending.pop(request_id, None)
            child_end.close()
            os.close(stderr_write)
        if answer.get("op") != "spawned":
            parent_end.close()
            os.close(stderr_read)
            raise SpawnError(f"the zygote could not fork a worker: {answer.get('error')}")
        started = answer.get("started")
        return WorkerProcess(
            int(answer["pid"]), parent_end, stderr_read, answer["exited"], started if isinstance(started, int) else None
        )

    async def _send(self, message: bytes, fds: list[int], reply: asyncio.Future[dict[str, Any]]) -> None:
        """Send a request to the zygote, one sender at a time in the order they came, waiting for room when a
        burst has filled the socket (a few hundred kilobytes) faster than the zygote reads. Not sent if the zygote
        is lost meanwhile: `reply` then says so."""
        async with self._sending:
            while not reply.done():
                assert self._control is not None and self._loop is not None
                try:
                    socket.send_fds(self._control, [message], fds)
                    return
                except BlockingIOError:
                    await self._room(self._control, self._loop, reply)

    async def _room(
        self, control: socket.socket, loop: asyncio.AbstractEventLoop, reply: asyncio.Future[dict[str, Any]]
    ) -> None:
        """Until the control socket can take more, or the zygote is lost (`_lost` answers `reply`)."""
        writable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not writable.done():
                writable.set_result(None)

        loop.add_writer(control.fileno(), wake)
        try:
            either: set[asyncio.Future[Any]] = {writable, reply}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._control is control:  # (`_lost` removed it before closing the socket)
                loop.remove_writer(control.fileno())

    def _running(self) -> bool:
        return self._process is not None and self._process.returncode is None and self._control is not None

    async def _ensure_running(self) -> None:
        if self._running():
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._running():
                return
            await self._start()

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        server_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # matplotlib's font cache, built once per machine and user rather than once per run.
        cache = Path(tempfile.gettempdir()) / f"rlm-matplotlib-{os.getuid()}"
        cache.mkdir(mode=0o700, exist_ok=True)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-c",
                _BOOT.format(path=_BACKEND_DIR),
                str(zygote_end.fileno()),
                str(os.getpid()),
                json.dumps(self.preload),
                pass_fds=(zygote_end.fileno(),),
                env={**BASE_ENVIRONMENT, "MPLCONFIGDIR": str(cache)},
                cwd="/",
                start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        finally:
            zygote_end.close()
        server_end.setblocking(False)
        ready = self._loop.create_future()
        self._pending[0] = ready
        self._control = server_end
        self._loop.add_reader(server_end.fileno(), self._on_readable)
        try:
            hello = await asyncio.wait_for(ready, 60)
        except TimeoutError as exc:
            await self.close()
            raise SpawnError("the worker zygote did not start") from exc
        finally:
            self._pending.pop(0, None)
        log.debug("worker zygote started, pid %s", hello["pid"])

    def _on_readable(self) -> None:
        assert self._control is not None
        while True:
            try:
                data = self._control.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._handle(json.loads(data))

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "exited":
            exited = self._exits.pop(int(message["pid"]), None)
            if exited is not None and not exited.done():
                exited.set_result(int(message["returncode"]))
            return
        if op == "spawned":
            # A worker that dies at once is reported right behind its `spawned`, often in the same read, before the
            # spawn that asked for it resumes: the future of its exit must exist from here, not from there.
            assert self._loop is not None
            message["exited"] = self._exits[int(message["pid"])] = self._loop.create_future()
        future = self._pending.get(0 if op == "ready" else int(message.get("id", -1)))
        if future is not None and not future.done():
            future.set_result(message)

    def _lost(self) -> None:
        """The zygote died: its workers die with it (PDEATHSIG); fail whatever waited on it."""
        if self._control is not None and self._loop is not None:
            self._loop.remove_reader(self._control.fileno())
            self._loop.remove_writer(self._control.fileno())
            self._control.close()
        self._control = None
        for future in self._pending.values():
            if not future.done():
                future.set_result({"op": "failed", "error": "the worker zygote exited"})
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(-signal.SIGKILL)
        self._exits.clear()

    async def close(self) -> None:
        """Close the control socket: the zygote then kills every worker's process group and exits (killed
        if it has not within a few seconds)."""
        process = self._process
        self._lost()
        self._process = None
        if process is not None and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 3)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
