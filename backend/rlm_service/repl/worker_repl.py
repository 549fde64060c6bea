"""A REPL whose cells run in a worker process (`worker.py`) reached over the protocol channel.

What every kind of worker REPL shares, wherever the worker runs (a local confined process today; a
container or a remote sandbox would be another `Launcher`): the init message, serving the worker's
`llm_batch`/`rlm_batch` requests on the event loop within a budget of held bytes, trusting nothing the
worker sends (every size and type checked), and restarting the worker with `context` reloaded when a cell
times out, the worker dies or breaks the protocol, or its launcher stops it; the cell's outcome then says
why and that the variables were lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import protocol
from .base import RESTARTED_NOTE, CellOutcome, ReplError, ReplOptions, RunStart, SubCalls
from .executor import MAX_ANSWER_CHARS, MAX_FIGURE_BYTES, MAX_FIGURES

MAX_VARIABLES = 50
_REQUESTS = ("batch", "rlm")
MAX_REQUESTS_IN_FLIGHT = 64
"""Requests of one worker served at once; past it the server reads no more of them until one is answered (each
of a well-behaved worker's threads waits for the reply to its one request)."""
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class Worker(Protocol):
    """One running worker, as its launcher started it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def kill(self) -> None:
        """Stop the worker and everything it started, now."""

    async def reap(self) -> None:
        """Wait (briefly) until the killed or dead worker is gone."""

    async def ended(self) -> None:
        """Until the worker has ended, by itself or killed."""

    def describe_exit(self) -> str:
        """How the worker ended, in words for the root model ("killed by signal 9 …")."""

    def killed_by_memory(self) -> bool:
        """Whether its end looks like the memory limit (SIGKILL)."""


Stop = Callable[[str], Awaitable[None]]
"""Stops the REPL's worker now; the cell that finds it gone reports the reason given."""


class Launcher(Protocol):
    """Where workers run: starts them, says what their init message needs, watches their resources."""

    async def launch(self, init: dict[str, Any], answer: str) -> tuple[Worker, dict[str, Any]]:
        """Start a worker, send it `init` (plus this launcher's own fields) and `answer`, and return it
        with its `ready` head; raises `ReplError` if it does not start."""

    async def watch(self, stop: Stop) -> None:
        """Runs for the REPL's life: calls `stop(reason)` when the worker must go (its disk use, say)."""


class _Budget:
    """Bytes of request texts (prompts, contexts) and of replies not yet sent that the server holds for one run
    at once: a request that does not fit waits, unread, until earlier ones are served. First come, first
    served: a large reply waiting for room is not overtaken by smaller ones, which could otherwise keep the
    budget from ever emptying enough for it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = asyncio.Event()

    async def take(self, size: int) -> int:
        turn = object()
        self._queue.append(turn)
        try:
            while self._queue[0] is not turn or self.used + size > self.capacity:
                self._changed.clear()
                await self._changed.wait()
            self.used += size
        finally:
            self._queue.remove(turn)
            self._changed.set()  # the next in line may fit now
        return size

    def give(self, size: int) -> None:
        self.used -= size
        self._changed.set()


class WorkerRepl:
    """A REPL whose cells run in a worker started by `launcher`, restarted when a cell loses it."""

    def __init__(self, launcher: Launcher, options: ReplOptions) -> None:
        self.launcher = launcher
        self.options = options
        self._worker: Worker | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._answer_content = ""
        self._budget = _Budget(protocol.MAX_MESSAGE_BYTES)
        self._stopped_because: str | None = None
        """Why the launcher stopped the worker, for the outcome of the cell that finds it gone."""
        self._lost: str | None = None
        """Why the variables were lost since the last `begin_run` (a restart), for the next run."""

    async def start(self) -> None:
        await self._spawn()
        self._watcher = asyncio.ensure_future(self.launcher.watch(self._stop))

    async def _spawn(self) -> None:
        init = {
            "op": "init",
            "memory_mb": self.options.memory_mb,
            "cpu_seconds": self.options.cpu_seconds,
            "network": self.options.network,
            "max_output_chars": self.options.max_output_chars,
            "sandbox": self.options.sandbox,
            "processes": self.options.processes,
            "landlock": self.options.landlock,
        }
        self._worker, _ = await self.launcher.launch(init, self._answer_content)

    async def _stop(self, reason: str) -> None:
        if self._worker is not None:
            self._stopped_because = reason
            self._worker.kill()
            await self._worker.reap()

    async def _restart(self, reason: str) -> None:
        self._lost = reason
        self._stopped_because = None  # told now, not to a later cell that loses a worker of its own
        if self._worker is not None:
            self._worker.kill()
            await self._worker.reap()
            self._worker = None
        await self._spawn()

    async def execute(self, code: str, timeout: float, calls: SubCalls) -> CellOutcome:
        if self._worker is None:
            await self._spawn()
        worker = self._worker
        assert worker is not None
        started = time.monotonic()
        batches: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.timeout(timeout):
                await _send(worker, {"op": "exec"}, [code])
                while True:
                    message = await self._receive(worker)
                    if message.op in _REQUESTS:
                        _check_request(message)
                        task = asyncio.create_task(self._serve(worker, message, calls))
                        batches.add(task)
                        task.add_done_callback(batches.discard)
                        if len(batches) >= MAX_REQUESTS_IN_FLIGHT:  # read no more until one is answered
                            await _room_or_end(worker, batches)
                    elif message.op == "done":
                        outcome = self._outcome(message, started)
                        self._answer_content = outcome.answer_content
                        return outcome
                    else:
                        raise protocol.ProtocolError(f"an unexpected {message.op[:40]!r} message")
        except TimeoutError:
            reason = f"TimeoutError: the cell ran for more than {timeout:g} s and was stopped (RLM_EXEC_TIMEOUT_S)."
        except protocol.ProtocolError as exc:
            worker.kill()
            reason = (
                f"ProtocolError: the REPL worker sent {exc}, which its channel to the server does not "
                "allow; it was stopped and replaced."
            )
        except (protocol.ChannelClosed, ConnectionError):
            await worker.reap()
            reason = f"WorkerDied: {worker.describe_exit()} while running this cell."
            if worker.killed_by_memory():
                reason += f" The worker's memory limit is {self.options.memory_mb} MB."
        except asyncio.CancelledError:
            # The run was cancelled mid-cell. A cell cannot be interrupted, so its worker is stopped with it;
            # a session keeps the REPL, and its next run finds the worker gone, restarts it and is told why.
            worker.kill()
            self._lost = "the run before was cancelled while a cell ran, which stopped the REPL worker"
            raise
        finally:
            for task in batches:
                task.cancel()
            if batches:
                # and waited for: a child run (`rlm_batch`) cleans up as it is cancelled (its worker, its files, its
                # uid), which must be done before its run can end (and a stopping server remove the run files)
                await asyncio.gather(*batches, return_exceptions=True)
        reason, self._stopped_because = self._stopped_because or reason, None
        await self._restart(reason[:300])
        return CellOutcome(
            stdout="",
            truncated=False,
            duration_ms=int((time.monotonic() - started) * 1000),
            error=f"{reason} {RESTARTED_NOTE}",
            answer_content=self._answer_content,
            answer_ready=False,
            restarted=True,
        )

    async def begin_run(self, timeout: float) -> RunStart:
        """Reset `answer` and list the variables; a worker found dead is restarted (and that is said)."""
        self._answer_content = ""
        worker = self._worker
        if worker is not None:
            try:
                async with asyncio.timeout(timeout):
                    await _send(worker, {"op": "begin"})
                    message = await self._receive(worker)
                if message.op != "begun" or len(message.texts) > MAX_VARIABLES:
                    raise protocol.ProtocolError("a malformed 'begun' message")
                lost, self._lost = self._lost, None
                return RunStart([(line or "")[:200] for line in message.texts], restarted=lost)
            except (TimeoutError, protocol.ProtocolError, protocol.ChannelClosed, ConnectionError):
                worker.kill()
                await worker.reap()
                self._lost = self._lost or self._stopped_because or worker.describe_exit()
            except asyncio.CancelledError:
                # The run was cancelled while the worker listed its variables: its `begun` (or the rest of it)
                # would be read as the answer to the next message, so the worker is stopped, as mid-cell.
                worker.kill()
                self._lost = (
                    "the run before was cancelled while the REPL listed its variables, which stopped the REPL worker"
                )
                raise
        await self._restart(self._lost or "the REPL worker was gone")
        lost, self._lost = self._lost, None
        return RunStart([], restarted=lost)

    async def _receive(self, worker: Worker) -> protocol.Message:
        """The worker's next message; a request's texts are counted against the budget while it is served."""

        async def reserve(head: dict[str, Any], size: int) -> int:
            return await self._budget.take(size) if head["op"] in _REQUESTS else 0

        return await protocol.read_message(worker.reader, reserve, self._budget.give)

    async def _serve(self, worker: Worker, message: protocol.Message, calls: SubCalls) -> None:
        """Answer a worker's `batch` (llm_batch) or `rlm` (rlm_batch) request; it waits for the reply.
        The request's texts count against the run's budget until the reply is sent."""
        try:
            texts = message.texts
            reply: dict[str, Any] = {"op": "reply", "id": message.head["id"]}
            results: list[str] = []
            try:
                if message.op == "batch":
                    results = await calls.batch([text or "" for text in texts])
                else:
                    half = len(texts) // 2
                    results = await calls.rlm([text or "" for text in texts[:half]], texts[half:])
            except Exception as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
            message.texts = []  # the prompts need not wait for the reply to be sent
            del texts
            self._budget.give(message.held)
            message.held = 0
            # The reply counts against the budget until it is sent: a worker that sends requests faster than it
            # reads their replies (100,000 empty prompts make 10 MB of refusals) would otherwise pile them up in
            # the server's memory. Counted in characters (a reply far over the budget takes all of it).
            size = await self._budget.take(min(sum(len(result) for result in results), self._budget.capacity))
            try:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await _send(worker, reply, results)
            finally:
                self._budget.give(size)
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
            stdout=(stdout or "")[:shown],
            error=None if error is None else error[: 4 * shown],
            truncated=head.get("truncated") is True,
            duration_ms=int((time.monotonic() - started) * 1000),
            answer_content=(answer or "")[:MAX_ANSWER_CHARS],
            answer_ready=head.get("answer_ready") is True,
            notes=[(note or "")[:500] for note in texts[3 : 3 + notes]],
            figures=_valid_figures(texts[3 + notes :]),
        )

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if worker is not None:
            await worker.reap()


async def _room_or_end(worker: Worker, batches: set[asyncio.Task[None]]) -> None:
    """Until one of the worker's requests in flight is answered; `ChannelClosed` if the worker ends first (its
    death is seen at once, not when a request's model calls end, which may take minutes)."""
    ended = asyncio.ensure_future(worker.ended())
    try:
        await asyncio.wait({*batches, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
    if ended.done() and not ended.cancelled():
        raise protocol.ChannelClosed()


async def _send(worker: Worker, head: dict[str, Any], texts: list[str] | list[protocol.Text] | None = None) -> None:
    worker.writer.writelines(protocol.encode(head, texts or ()))
    await worker.writer.drain()


def _check_request(message: protocol.Message) -> None:
    """A `batch` request carries prompts; an `rlm` request as many prompts as contexts (a context may be None)."""
    texts = message.texts
    prompts = texts if message.op == "batch" else texts[: len(texts) // 2]
    if not isinstance(message.head.get("id"), int) or None in prompts or (message.op == "rlm" and len(texts) % 2):
        raise protocol.ProtocolError(f"a malformed {message.op!r} request")


def _valid_figures(figures: list[str | None]) -> list[str]:
    """Figures from a worker: a few base64 strings of bounded size, nothing else."""
    return [
        item
        for item in figures[:MAX_FIGURES]
        if isinstance(item, str) and len(item) <= MAX_FIGURE_BYTES * 4 // 3 + 4 and _BASE64.fullmatch(item)
    ]


__all__ = ["Launcher", "ReplError", "Stop", "Worker", "WorkerRepl"]
