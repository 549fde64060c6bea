"""`RLM_REPL=subprocess`: each run's code runs in its own confined worker process.

The server side of `worker.py`. The zygote forks the worker with an empty environment (an allow-list,
not a copy of ours), in the run's working directory, in a new session so that killing the process
group takes every child along. While a cell runs it serves the worker's `llm_batch` requests on the event
loop. A cell past its timeout, or a worker that dies, gets a fresh worker with `context` reloaded;
the outcome says the variables were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import protocol
from .base import RESTARTED_NOTE, AsyncBatch, AsyncRlm, CellOutcome, ReplError, ReplOptions
from .executor import MAX_FIGURE_BYTES, MAX_FIGURES, as_sub_calls
from .spawner import BASE_ENVIRONMENT, SpawnError, WorkerProcess, Zygote
from .workspace import Workspace

log = logging.getLogger("rlm_service")

MAX_ANSWER_CHARS = 16 * 1024 * 1024


def worker_environment(workdir: Path) -> dict[str, str]:
    """The whole environment of a worker: the zygote's allow-list and its own directory, nothing else."""
    return {**BASE_ENVIRONMENT, "HOME": str(workdir), "TMPDIR": str(workdir), "PYTHONIOENCODING": "utf-8",
            "MPLCONFIGDIR": str(workdir / ".matplotlib")}


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _valid_figures(figures: object) -> list[str]:
    """Figures from a worker: a few base64 strings of bounded size, nothing else."""
    if not isinstance(figures, list):
        return []
    return [item for item in figures[:MAX_FIGURES]
            if isinstance(item, str) and len(item) <= MAX_FIGURE_BYTES * 4 // 3 + 4 and _BASE64.fullmatch(item)]


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
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else ""
        hint = " (most often: it ran out of memory or hit a process limit)" if returncode == -signal.SIGKILL else ""
        return f"the worker process was killed by signal {-returncode} {name}{hint}".replace("  ", " ")
    return f"the worker process exited with status {returncode}"


class _Worker:
    """One live worker process and its end of the channel."""

    def __init__(self, process: WorkerProcess, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, stderr_tail: deque[bytes]) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.stderr_tail = stderr_tail
        self.send_lock = asyncio.Lock()
        self.layers: list[str] = []
        self.skipped: dict[str, str] = {}

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            self.writer.write(protocol.encode(message))
            await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        try:
            header = await self.reader.readexactly(protocol.HEADER.size)
            (size,) = protocol.HEADER.unpack(header)
            if size > protocol.MAX_WORKER_FRAME:
                raise ValueError(f"the worker sent a message of {size:,} bytes")
            return protocol.decode(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise protocol.ChannelClosed() from exc

    def kill(self, uid: int | None) -> None:
        """SIGKILL the worker's whole process group. Where seccomp did not pin its descendants to that
        group (they could setsid away), also every process of its private uid, if it has one."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if uid is not None and not any(layer.startswith("seccomp") for layer in self.layers):
            _kill_uid(uid)
        self.writer.close()

    def stderr_text(self) -> str:
        return b"".join(self.stderr_tail).decode("utf-8", "replace").strip()[-2000:]


def _kill_uid(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


async def _drain_stderr(fd: int, tail: deque[bytes]) -> None:
    """Keep the last few kilobytes a worker wrote to its stderr, for the error if it crashes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            with contextlib.suppress(Exception):
                while chunk := await reader.read(4096):
                    tail.append(chunk)
        finally:
            transport.close()


class SubprocessRepl:
    """A REPL whose cells run in a confined worker process, restarted when a cell is killed."""

    def __init__(self, workspace: Workspace, batch: AsyncBatch, options: ReplOptions, zygote: Zygote,
                 rlm: AsyncRlm | None = None) -> None:
        self.workspace = workspace
        self.zygote = zygote
        self.rlm = rlm or as_sub_calls(batch)
        self.batch = batch
        self.options = options
        self._worker: _Worker | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._answer_content = ""

    async def start(self) -> None:
        await self._spawn()

    async def _spawn(self) -> None:
        try:
            process = await self.zygote.spawn(self.workspace.workdir, worker_environment(self.workspace.workdir))
        except SpawnError as exc:
            raise ReplError(str(exc)) from exc
        reader, writer = await asyncio.open_unix_connection(sock=process.channel)
        tail: deque[bytes] = deque(maxlen=16)
        self._track(_drain_stderr(process.stderr, tail))
        worker = _Worker(process, reader, writer, tail)
        self._worker = worker
        size = self.workspace.input_path.stat().st_size
        await worker.send({
            "op": "init", "input_path": str(self.workspace.input_path), "memory_mb": self.options.memory_mb,
            "cpu_seconds": self.options.cpu_seconds, "network": self.options.network,
            "max_output_chars": self.options.max_output_chars, "uid": self.workspace.worker_uid,
            "server_pid": os.getpid(), "sandbox": self.options.sandbox, "answer": self._answer_content,
        })
        try:
            async with asyncio.timeout(30 + size / 50e6):
                ready = await worker.recv()
        except (protocol.ChannelClosed, TimeoutError) as exc:
            worker.kill(self.workspace.worker_uid)
            await self._reap(worker)
            detail = worker.stderr_text()
            raise ReplError(f"the REPL worker did not start: {_describe_exit(worker.process.returncode)}"
                            + (f": {detail}" if detail else "")) from exc
        if ready["op"] != "ready":
            worker.kill(self.workspace.worker_uid)
            await self._reap(worker)
            raise ReplError(f"the REPL worker did not start: {ready.get('error', ready)}")
        worker.layers = [str(layer) for layer in ready.get("layers", [])]
        worker.skipped = {str(k): str(v) for k, v in dict(ready.get("skipped", {})).items()}
        _report_sandbox_once(worker.layers, worker.skipped)

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, worker: _Worker) -> None:
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(2):
                await worker.process.wait()

    async def _restart(self) -> None:
        if self._worker is not None:
            self._worker.kill(self.workspace.worker_uid)
            await self._reap(self._worker)
            self._worker = None
        await self._spawn()

    async def execute(self, code: str, timeout: float) -> CellOutcome:
        if self._worker is None:
            await self._spawn()
        worker = self._worker
        assert worker is not None
        started = time.monotonic()
        batches: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.timeout(timeout):
                await worker.send({"op": "exec", "code": code})
                while True:
                    message = await worker.recv()
                    if message["op"] in ("batch", "rlm"):
                        task = asyncio.create_task(self._serve_batch(worker, message))
                        batches.add(task)
                        task.add_done_callback(batches.discard)
                    elif message["op"] == "done":
                        outcome = self._outcome(message, started)
                        self._answer_content = outcome.answer_content
                        return outcome
        except TimeoutError:
            reason = (f"TimeoutError: the cell ran for more than {timeout:g} s and was stopped "
                      "(RLM_EXEC_TIMEOUT_S).")
        except (protocol.ChannelClosed, ConnectionError, ValueError):
            await self._reap(worker)
            reason = f"WorkerDied: {_describe_exit(worker.process.returncode)} while running this cell."
            if worker.process.returncode == -signal.SIGKILL:
                reason += f" The worker's memory limit is {self.options.memory_mb} MB."
        finally:
            for task in batches:
                task.cancel()
        await self._restart()
        return CellOutcome(
            stdout="", truncated=False, duration_ms=int((time.monotonic() - started) * 1000),
            error=f"{reason} {RESTARTED_NOTE}",
            answer_content=self._answer_content, answer_ready=False, restarted=True,
        )

    async def _serve_batch(self, worker: _Worker, message: dict[str, Any]) -> None:
        """Answer a worker's `batch` (llm_batch) or `rlm` (rlm_batch) request; it waits for the reply."""
        prompts = message.get("prompts")
        contexts = message.get("contexts")
        reply: dict[str, Any] = {"op": "reply", "id": message.get("id")}
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            reply["error"] = "takes a list of strings"
        elif message["op"] == "rlm" and (not isinstance(contexts, list) or len(contexts) != len(prompts)
                                         or not all(c is None or isinstance(c, str) for c in contexts)):
            reply["error"] = "rlm_batch() takes one context (a str or None) per prompt"
        else:
            try:
                if message["op"] == "batch":
                    reply["results"] = await self.batch(prompts)
                else:
                    reply["results"] = await self.rlm(prompts, contexts)  # type: ignore[arg-type]
            except Exception as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.send(reply)

    def _outcome(self, message: dict[str, Any], started: float) -> CellOutcome:
        """Build the outcome from a worker's message, trusting none of its types or sizes."""
        error = message.get("error")
        notes = message.get("notes")
        shown = self.options.max_output_chars + 200
        return CellOutcome(
            stdout=str(message.get("stdout", ""))[:shown], error=None if error is None else str(error)[:4 * shown],
            truncated=message.get("truncated") is True, duration_ms=int((time.monotonic() - started) * 1000),
            answer_content=str(message.get("answer_content", ""))[:MAX_ANSWER_CHARS],
            answer_ready=message.get("answer_ready") is True,
            notes=[str(note)[:500] for note in notes[:20]] if isinstance(notes, list) else [],
            figures=_valid_figures(message.get("figures")),
        )

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill(self.workspace.worker_uid)
        for task in list(self._tasks):
            task.cancel()
        if worker is not None:
            await self._reap(worker)
