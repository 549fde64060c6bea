"""`RLM_REPL=subprocess`: each run's code runs in its own confined worker process.

The server side of `worker.py`. The zygote forks the worker with an empty environment (an allow-list,
not a copy of ours), in the run's working directory, in a new session so that killing the process
group takes every child along. While a cell runs it serves the worker's `llm_batch` requests on the event
loop. A cell past its timeout, a worker that dies or breaks the channel protocol, and a run whose files
pass its disk cap get a fresh worker with `context` reloaded; the outcome says why and that the variables
were lost.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import protocol
from .base import RESTARTED_NOTE, AsyncBatch, AsyncRlm, CellOutcome, ReplError, ReplOptions
from .executor import MAX_FIGURE_BYTES, MAX_FIGURES, as_sub_calls
from .spawner import BASE_ENVIRONMENT, SpawnError, WorkerProcess, Zygote
from .workspace import Workspace, kill_uid

log = logging.getLogger("rlm_service")

MAX_ANSWER_CHARS = 16 * 1024 * 1024
MAX_FILE_BYTES = 1024**3
"""The largest file a worker may write (RLIMIT_FSIZE), when the run's disk cap is not smaller."""
DISK_CHECK_S = 0.25
_REQUESTS = ("batch", "rlm")


def worker_environment(workdir: Path) -> dict[str, str]:
    """The whole environment of a worker: the zygote's allow-list and its own directory, nothing else."""
    return {**BASE_ENVIRONMENT, "HOME": str(workdir), "TMPDIR": str(workdir), "PYTHONIOENCODING": "utf-8",
            "MPLCONFIGDIR": str(workdir / ".matplotlib")}


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _valid_figures(figures: list[str | None]) -> list[str]:
    """Figures from a worker: a few base64 strings of bounded size, nothing else."""
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


class _Budget:
    """Bytes of request texts (prompts, contexts) the server holds for one run at once: a request that
    does not fit waits, unread, until earlier ones are served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = asyncio.Event()

    async def take(self, size: int) -> int:
        while self.used + size > self.capacity:
            self._room.clear()
            await self._room.wait()
        self.used += size
        return size

    def give(self, size: int) -> None:
        self.used -= size
        self._room.set()


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

    async def send(self, head: dict[str, Any], texts: Sequence[protocol.Text] = ()) -> None:
        async with self.send_lock:
            self.writer.writelines(protocol.encode(head, texts))
            await self.writer.drain()

    async def recv(self, budget: _Budget | None = None) -> protocol.Message:
        """The worker's next message; a request's texts are counted against `budget` while it is served."""

        async def reserve(head: dict[str, Any], size: int) -> int:
            return await budget.take(size) if budget is not None and head["op"] in _REQUESTS else 0

        return await protocol.read_message(self.reader, reserve)

    def kill(self, uid: int | None) -> None:
        """SIGKILL the worker's whole process group. Where seccomp did not pin its descendants to that
        group (they could setsid away), also every process of its private uid, if it has one."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if uid is not None and not any(layer.startswith("seccomp") for layer in self.layers):
            kill_uid(uid)
        self.writer.close()

    def stderr_text(self) -> str:
        return b"".join(self.stderr_tail).decode("utf-8", "replace").strip()[-2000:]


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
        self._budget = _Budget(protocol.MAX_MESSAGE_BYTES)
        self._stopped_because: str | None = None
        """Why the disk watcher stopped the worker, for the outcome of the cell that finds it gone."""

    async def start(self) -> None:
        await self._spawn()
        self._track(self._watch_disk())

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
            "server_pid": os.getpid(), "sandbox": self.options.sandbox, "processes": self.options.processes,
            "max_file_bytes": min(self.options.disk_mb * 1024 * 1024, MAX_FILE_BYTES),
            "landlock": self.options.landlock,
        }, [self._answer_content])
        try:
            async with asyncio.timeout(30 + size / 50e6):
                ready = await worker.recv()
        except (protocol.ChannelClosed, protocol.ProtocolError, TimeoutError) as exc:
            worker.kill(self.workspace.worker_uid)
            await self._reap(worker)
            detail = worker.stderr_text()
            raise ReplError(f"the REPL worker did not start: {_describe_exit(worker.process.returncode)}"
                            + (f": {detail}" if detail else "")) from exc
        if ready.op != "ready":
            worker.kill(self.workspace.worker_uid)
            await self._reap(worker)
            raise ReplError(f"the REPL worker did not start: {str(ready.head.get('error', ready.op))[:2000]}")
        worker.layers = [str(layer) for layer in _as_list(ready.head.get("layers"))[:20]]
        skipped = ready.head.get("skipped")
        worker.skipped = {str(k): str(v) for k, v in list(skipped.items())[:20]} if isinstance(skipped, dict) else {}
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
                await worker.send({"op": "exec"}, [code])
                while True:
                    message = await worker.recv(self._budget)
                    if message.op in _REQUESTS:
                        _check_request(message)
                        task = asyncio.create_task(self._serve_batch(worker, message))
                        batches.add(task)
                        task.add_done_callback(batches.discard)
                    elif message.op == "done":
                        outcome = self._outcome(message, started)
                        self._answer_content = outcome.answer_content
                        return outcome
                    else:
                        raise protocol.ProtocolError(f"an unexpected {message.op[:40]!r} message")
        except TimeoutError:
            reason = (f"TimeoutError: the cell ran for more than {timeout:g} s and was stopped "
                      "(RLM_EXEC_TIMEOUT_S).")
        except protocol.ProtocolError as exc:
            worker.kill(self.workspace.worker_uid)
            reason = (f"ProtocolError: the REPL worker sent {exc}, which its channel to the server does not "
                      "allow; it was stopped and replaced.")
        except (protocol.ChannelClosed, ConnectionError):
            await self._reap(worker)
            reason = f"WorkerDied: {_describe_exit(worker.process.returncode)} while running this cell."
            if worker.process.returncode == -signal.SIGKILL:
                reason += f" The worker's memory limit is {self.options.memory_mb} MB."
        finally:
            for task in batches:
                task.cancel()
        reason, self._stopped_because = self._stopped_because or reason, None
        await self._restart()
        return CellOutcome(
            stdout="", truncated=False, duration_ms=int((time.monotonic() - started) * 1000),
            error=f"{reason} {RESTARTED_NOTE}",
            answer_content=self._answer_content, answer_ready=False, restarted=True,
        )

    async def _serve_batch(self, worker: _Worker, message: protocol.Message) -> None:
        """Answer a worker's `batch` (llm_batch) or `rlm` (rlm_batch) request; it waits for the reply.
        The request's texts count against the run's budget until the reply is sent."""
        try:
            texts = message.texts
            reply: dict[str, Any] = {"op": "reply", "id": message.head["id"]}
            results: list[str] = []
            try:
                if message.op == "batch":
                    results = await self.batch(texts)  # type: ignore[arg-type]  # _check_request: no None
                else:
                    half = len(texts) // 2
                    results = await self.rlm(texts[:half], texts[half:])  # type: ignore[arg-type]
            except Exception as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
            message.texts = []  # the prompts need not wait for the reply to be sent
            del texts
            with contextlib.suppress(ConnectionError, RuntimeError):
                await worker.send(reply, results)
        finally:
            self._budget.give(message.held)

    def _outcome(self, message: protocol.Message, started: float) -> CellOutcome:
        """Build the outcome from a worker's `done`, trusting none of its types or sizes."""
        head, texts = message.head, message.texts
        notes = head.get("notes")
        if not isinstance(notes, int) or not 0 <= notes <= 20 or not 3 + notes <= len(texts) <= 3 + notes + MAX_FIGURES:
            raise protocol.ProtocolError("a malformed 'done' message")
        stdout, error, answer = texts[:3]
        shown = self.options.max_output_chars + 200
        return CellOutcome(
            stdout=(stdout or "")[:shown], error=None if error is None else error[:4 * shown],
            truncated=head.get("truncated") is True, duration_ms=int((time.monotonic() - started) * 1000),
            answer_content=(answer or "")[:MAX_ANSWER_CHARS],
            answer_ready=head.get("answer_ready") is True,
            notes=[(note or "")[:500] for note in texts[3:3 + notes]],
            figures=_valid_figures(texts[3 + notes:]),
        )

    async def _watch_disk(self) -> None:
        """Stop the worker when the run's files pass `disk_mb`, and delete them. The directory is walked
        every quarter second (less often when a walk takes long), so a fast writer can pass the cap by
        what it writes in between; one file cannot pass it (RLIMIT_FSIZE)."""
        limit = self.options.disk_mb * 1024 * 1024
        while True:
            started = time.monotonic()
            problem = await asyncio.to_thread(self.workspace.over_disk_limit, limit)
            if problem is not None and self._worker is not None:
                worker = self._worker
                self._stopped_because = (f"DiskLimit: the run's files {problem} (RLM_WORKER_DISK_MB is "
                                         f"{self.options.disk_mb:,} MB); the worker was stopped and every file "
                                         "in its directory deleted.")
                log.warning("run directory %s: %s; worker stopped", self.workspace.root, problem)
                worker.kill(self.workspace.worker_uid)
                await self._reap(worker)
                await asyncio.to_thread(self.workspace.empty_workdir)
            await asyncio.sleep(max(DISK_CHECK_S, 4 * (time.monotonic() - started)))

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill(self.workspace.worker_uid)
        for task in list(self._tasks):
            task.cancel()
        if worker is not None:
            await self._reap(worker)


def _check_request(message: protocol.Message) -> None:
    """A `batch` request carries prompts; an `rlm` request as many prompts as contexts (a context may be None)."""
    texts = message.texts
    prompts = texts if message.op == "batch" else texts[: len(texts) // 2]
    if (not isinstance(message.head.get("id"), int) or None in prompts
            or (message.op == "rlm" and len(texts) % 2)):
        raise protocol.ProtocolError(f"a malformed {message.op!r} request")


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
