"""`RLM_REPL=inprocess`: cells run in a thread of the server process. For trusted, single-user use.

Limits, by design of running in-process: generated code can read everything the server can (its
environment, its files, its memory, the API key included), it shares the server's memory, and a cell
that blocks inside C code cannot be stopped. On timeout or cancellation we raise an exception inside
the cell's thread, which stops pure-Python loops; a cell that still does not stop is abandoned, and
the run goes on in a fresh namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import threading
import time
from typing import Any

from .base import RESTARTED_NOTE, CellOutcome, Repl, ReplOptions, RunStart, SubCalls, register
from .executor import CellRunner
from .worker import load_text
from .workspace import Workspace

_GRACE_S = 1.0


class CellInterrupted(BaseException):
    """Raised inside a cell's thread to stop it (a BaseException, so `except Exception` cannot eat it)."""


def _interrupt(thread: threading.Thread) -> None:
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(CellInterrupted))


def _settle(done: asyncio.Future[CellOutcome], result: CellOutcome | None, failure: BaseException | None) -> None:
    """Complete a cell's future from its thread (once: a timed-out cell may finish later)."""
    if done.done():
        return
    if failure is not None:
        done.set_exception(failure)
    else:
        assert result is not None
        done.set_result(result)


class InprocessRepl:
    """A REPL whose namespace lives in the server process."""

    def __init__(self, workspace: Workspace, options: ReplOptions) -> None:
        self.workspace = workspace
        self.options = options
        self._cell_calls: SubCalls | None = None
        """What the running cell's llm_batch/rlm_batch reach."""
        self._runner: CellRunner | None = None
        self._context = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: set[concurrent.futures.Future[list[str]]] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        """The loop's tasks serving the cell's calls, to wait for once cancelled."""
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = await asyncio.to_thread(load_text, str(self.workspace.input_path))
        self._runner = self._new_runner("")

    def _new_runner(self, answer: str) -> CellRunner:
        return CellRunner(
            self._context,
            self._sync_batch,
            rlm=self._sync_rlm,
            max_output_chars=self.options.max_output_chars,
            answer=answer,
        )

    def _sync_rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        if self._cell_calls is None:
            raise RuntimeError("rlm_batch works only while a cell runs")
        return self._call(self._cell_calls.rlm(prompts, contexts))

    def _sync_batch(self, prompts: list[str]) -> list[str]:
        if self._cell_calls is None:
            raise RuntimeError("llm_batch works only while a cell runs")
        return self._call(self._cell_calls.batch(prompts))

    def _call(self, coroutine: Any) -> list[str]:
        """Run a coroutine on the server's loop from the cell's thread, and wait for it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._served(coroutine), self._loop)
        self._calls.add(future)
        try:
            results: list[str] = future.result()
            return results
        finally:
            self._calls.discard(future)

    async def _served(self, coroutine: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            return await coroutine
        finally:
            self._serving.discard(task)

    async def _cancel_calls(self) -> None:
        """Cancel the cell's calls and wait for them: a child run (`rlm_batch`) cleans up as it is cancelled (its
        worker, its files, its uid), which must be done before its parent's run can end."""
        for future in list(self._calls):
            future.cancel()
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)

    async def begin_run(self, timeout: float) -> RunStart:
        """Reset `answer` and list the namespace's variables (in a thread: their reprs are user code)."""
        assert self._runner is not None
        runner = self._runner
        try:
            variables = await asyncio.wait_for(asyncio.to_thread(runner.begin_run), timeout)
        except TimeoutError:
            self._runner = self._new_runner("")
            return RunStart([], restarted="listing the variables did not finish, so the namespace was renewed")
        return RunStart(variables)

    async def execute(self, code: str, timeout: float, calls: SubCalls) -> CellOutcome:
        assert self._runner is not None and self._loop is not None
        self._cell_calls = calls
        runner = self._runner
        done: asyncio.Future[CellOutcome] = self._loop.create_future()
        loop = self._loop

        def target() -> None:
            try:
                result = runner.run(code)
            except BaseException as exc:  # an interrupt that landed outside the cell's own code
                failure = RuntimeError(f"{type(exc).__name__}: {exc}")
                loop.call_soon_threadsafe(_settle, done, None, failure)
                return
            loop.call_soon_threadsafe(_settle, done, result, None)

        started = time.monotonic()
        thread = threading.Thread(target=target, name="rlm-cell", daemon=True)
        self._thread = thread
        thread.start()
        try:
            result = await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return await self._stop_cell(thread, done, started, timeout)
        except asyncio.CancelledError:
            _interrupt(thread)
            await self._cancel_calls()
            raise
        finally:
            self._thread = None
            self._cell_calls = None
        result.duration_ms = int((time.monotonic() - started) * 1000)
        return result

    async def _stop_cell(
        self, thread: threading.Thread, done: asyncio.Future[CellOutcome], started: float, timeout: float
    ) -> CellOutcome:
        _interrupt(thread)
        await self._cancel_calls()
        message = f"TimeoutError: the cell ran for more than {timeout:g} s and was stopped (RLM_EXEC_TIMEOUT_S)."
        restarted = False
        try:
            result = await asyncio.wait_for(asyncio.shield(done), _GRACE_S)
            stdout, truncated, answer = result.stdout, result.truncated, result.answer_content
        except (TimeoutError, RuntimeError):
            assert self._runner is not None
            answer = self._runner.answer[0]
            self._runner = self._new_runner(answer)
            stdout, truncated, restarted = "", False, True
            message += f" It could not be interrupted, so it was abandoned. {RESTARTED_NOTE}"
        return CellOutcome(
            stdout=stdout,
            error=message,
            truncated=truncated,
            duration_ms=int((time.monotonic() - started) * 1000),
            answer_content=answer,
            answer_ready=False,
            restarted=restarted,
        )

    async def close(self) -> None:
        if self._thread is not None:
            _interrupt(self._thread)
        await self._cancel_calls()
        self._runner = None


class InprocessBackend:
    """`RLM_REPL=inprocess`: nothing shared; each REPL is a namespace in the server."""

    isolates_uid = False
    keeps_off_network = False

    def __init__(self, preload: list[str]) -> None:
        self.preload = preload

    async def start(self) -> None:
        return None

    def make(self, workspace: Workspace, options: ReplOptions) -> Repl:
        return InprocessRepl(workspace, options)

    async def close(self) -> None:
        return None


register("inprocess")(InprocessBackend)
