"""The `subprocess` REPL: a confined worker per run, killed and replaced when a cell misbehaves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rlm_service.repl import protocol, subprocess_repl
from rlm_service.repl.base import CellOutcome, Repl, ReplError, ReplOptions
from rlm_service.repl.inprocess_repl import InprocessRepl
from rlm_service.repl.spawner import SpawnError, WorkerProcess, Zygote
from rlm_service.repl.subprocess_repl import SubprocessBackend
from rlm_service.repl.worker import load_text
from rlm_service.repl.worker_repl import _Budget
from rlm_service.repl.workspace import Workspace
from tests.conftest import descendant_commands, descendants, wait_until, worker_processes


class Echo:
    """The sub-calls of the cells: every prompt answered with `reply:<prompt>`."""

    async def batch(self, prompts: list[str]) -> list[str]:
        await asyncio.sleep(0)
        return [f"reply:{p}" for p in prompts]

    async def rlm(self, prompts: list[str], contexts: list[str | None]) -> list[str]:
        return await self.batch(prompts)


class Cells:
    """A REPL whose cells' sub-calls go to `Echo`."""

    def __init__(self, repl: Repl, workspace: Workspace) -> None:
        self.repl = repl
        self.workspace = workspace

    async def execute(self, code: str, timeout: float) -> CellOutcome:
        return await self.repl.execute(code, timeout, Echo())

    async def close(self) -> None:
        await self.repl.close()


@pytest.fixture
async def backend() -> AsyncIterator[SubprocessBackend]:
    backend = SubprocessBackend([])
    yield backend
    await backend.close()


@pytest.fixture
def zygote(backend: SubprocessBackend) -> Zygote:
    return backend.zygote


@pytest.fixture
async def repl(backend: SubprocessBackend) -> AsyncIterator[Cells]:
    workspace = Workspace.create()
    workspace.write_input("line one\nline two\n")
    handle = backend.make(workspace, ReplOptions(memory_mb=1024))
    await handle.start()
    yield Cells(handle, workspace)
    await handle.close()
    workspace.remove()


async def test_cells_share_a_namespace_and_reach_the_server(repl: Cells) -> None:
    assert (await repl.execute("n = len(context)\nn", 10)).stdout == "18"
    outcome = await repl.execute("llm_batch(['a', 'b']), llm_query('c'), n", 10)
    assert outcome.stdout == "(['reply:a', 'reply:b'], 'reply:c', 18)"


async def test_worker_collections_leave_the_preloaded_modules_alone(repl: Cells) -> None:
    """The zygote freezes what it preloaded before forking: a worker's garbage collections neither walk nor
    write to those objects, so the pages it shares with the zygote stay shared."""
    outcome = await repl.execute("import gc\ngc.get_freeze_count() > 5_000, len(gc.get_objects()) < 2_000", 10)
    assert outcome.stdout == "(True, True)", outcome


async def test_hung_cell_is_killed(repl: Cells) -> None:
    await repl.execute("kept = 1", 10)
    outcome = await repl.execute("while True:\n    pass", 1)
    assert outcome.restarted
    assert "TimeoutError" in (outcome.error or "") and "variable" in (outcome.error or "")
    after = await repl.execute("len(context), 'kept' in globals()", 10)
    assert after.stdout == "(18, False)"


async def test_answer_survives_a_restart(repl: Cells) -> None:
    await repl.execute("answer['content'] = 'draft'", 10)
    outcome = await repl.execute("import time\ntime.sleep(60)", 1)
    assert outcome.answer_content == "draft"
    assert (await repl.execute("answer['content']", 10)).stdout == "'draft'"


async def test_huge_allocation_fails_cleanly(repl: Cells) -> None:
    await repl.execute("kept = 1", 10)
    outcome = await repl.execute("import numpy\nblob = numpy.ones(3 * 1024 ** 3, dtype=numpy.uint8)", 20)
    assert "MemoryError" in (outcome.error or "")
    assert "memory limit of 1,024 MB (RLM_WORKER_MEMORY_MB)" in (outcome.error or ""), outcome.error
    assert (await repl.execute("1 + kept", 10)).stdout == "2"


async def test_worker_environment_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's environment holds a key and a canary when the zygote starts; its workers see neither.
    Mutant caught: the zygote started with a copy of the server's environment."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("RLM_TEST_CANARY", "canary-value")
    backend = SubprocessBackend([])
    workspace = Workspace.create()
    workspace.write_input("x")
    repl = Cells(backend.make(workspace, ReplOptions(memory_mb=1024)), workspace)
    try:
        await repl.repl.start()
        outcome = await repl.execute("import os\nsorted(os.environ)", 10)
    finally:
        await repl.close()
        workspace.remove()
        await backend.close()
    assert "OPENAI" not in outcome.stdout and "sk-should-not-leak" not in outcome.stdout
    assert "CANARY" not in outcome.stdout and "'PATH'" in outcome.stdout


async def test_worker_has_its_own_directory(repl: Cells) -> None:
    outcome = await repl.execute("import os\nopen('notes.txt', 'w').write('x')\nos.getcwd()", 10)
    assert outcome.error is None
    assert outcome.stdout.strip("'") == str(repl.workspace.workdir)


async def test_no_worker_left_after_close(repl: Cells) -> None:
    pid = repl.repl._worker.process.pid  # type: ignore[attr-defined]
    await repl.execute("import subprocess\nchild = subprocess.Popen(['sleep', '300'])", 10)
    await repl.close()
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or pid not in worker_processes())
    assert wait_until(lambda: not any(b"sleep\x00300" in command for command in descendant_commands()), timeout=10)


async def test_cancelled_cell_ends_the_worker(repl: Cells) -> None:
    pid = repl.repl._worker.process.pid  # type: ignore[attr-defined]
    task = asyncio.create_task(repl.execute("import time\ntime.sleep(300)", 600))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await repl.close()
    assert wait_until(lambda: pid not in worker_processes(), timeout=10)


@pytest.mark.parametrize("when", ["forked", "ready"])
async def test_a_run_cancelled_while_its_worker_starts_leaves_no_worker(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cancelled (by its client, or a stopping server) while its worker starts must not leave the worker
    behind, holding its input in memory: cancelled as soon as the zygote forked it, or while the server waits
    for its `ready`. Mutants caught: the launch killing the worker only on the errors it expects (each of its
    two places)."""
    backend = SubprocessBackend([])
    workspace = Workspace.create()
    workspace.write_input("x" * 50_000_000)  # the worker reads it before it says it is ready
    forked: list[int] = []
    spawn = backend.zygote.spawn

    async def spawn_then_cancel(cwd: Path, env: dict[str, str]) -> WorkerProcess:
        process = await spawn(cwd, env)
        forked.append(process.pid)
        if when == "forked":
            _cancel_this_task()  # lands at the launch's next wait, for its channel to the worker
        return process

    async def read_then_cancel(*args: Any) -> protocol.Message:
        _cancel_this_task()  # lands while the worker reads its input, before it is ready
        return await read_message(*args)

    backend.zygote.spawn = spawn_then_cancel  # type: ignore[method-assign]
    read_message = protocol.read_message
    if when == "ready":
        monkeypatch.setattr(protocol, "read_message", read_then_cancel)
    handle = backend.make(workspace, ReplOptions(memory_mb=1024))
    try:
        with pytest.raises(asyncio.CancelledError):
            await handle.start()
        assert forked and wait_until(lambda: forked[0] not in worker_processes(), timeout=10)
    finally:
        await handle.close()
        workspace.remove()
        await backend.close()


async def test_a_worker_that_cannot_start_takes_no_other_worker_with_it(
    backend: SubprocessBackend, repl: Cells
) -> None:
    """A run cancelled as its worker is forked deletes its directory at once, so the new worker's `chdir` fails.
    That exception went up into the zygote's own code in the forked process, whose clean-up killed the process
    group of every live worker: another run's cell died with "killed by signal 9" (seen as a flaky recursion
    test, a child run ending while its REPL started). The failed worker now exits with status 1 and says why."""
    assert (await repl.execute("kept = len(context)", 10)).error is None
    failed = await backend.zygote.spawn(repl.workspace.root / "deleted", {})
    failed.channel.close()
    async with asyncio.timeout(30):
        assert await failed.wait() == 1
    outcome = await repl.execute("kept", 10)
    assert outcome.error is None and outcome.stdout == "18", outcome
    with os.fdopen(failed.stderr, "rb") as stderr:
        assert b"FileNotFoundError" in stderr.read()


async def test_a_worker_that_dies_at_once_is_seen_to_end(zygote: Zygote, tmp_path: Path) -> None:
    """The zygote reports a worker that dies at once right behind the worker's `spawned`; when the server read
    both together (its event loop busy meanwhile, here for 0.5 s), the exit came before the spawn had made the
    future that waits for it, and was dropped: the worker's end was never known (a launch waited its two seconds
    and said the worker "stopped answering"; this test waited forever)."""
    await zygote.start()
    asyncio.get_running_loop().call_soon(time.sleep, 0.5)  # busy while the worker is forked and dies
    failed = await zygote.spawn(tmp_path / "missing", {})
    failed.channel.close()
    os.close(failed.stderr)
    async with asyncio.timeout(30):
        assert await failed.wait() == 1


async def test_a_worker_that_fails_to_start_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error of a worker that dies before it is ready carries the end of what it wrote to stderr (here the
    traceback of its `chdir`, its directory deleted), even when the server reads that pipe late (as on a busy
    event loop; here its reading starts 0.2 s late). Old behaviour: the tail was taken the moment the worker's
    exit was known, while the pipe still held what it wrote last: the error ended at the exit status."""
    drain = subprocess_repl._drain_stderr

    async def late_drain(fd: int, tail: deque[bytes]) -> None:
        await asyncio.sleep(0.2)
        await drain(fd, tail)

    monkeypatch.setattr(subprocess_repl, "_drain_stderr", late_drain)
    backend = SubprocessBackend([])
    workspace = Workspace.create()
    workspace.write_input("abc")
    handle = backend.make(workspace, ReplOptions(memory_mb=1024))
    shutil.rmtree(workspace.workdir)
    try:
        with pytest.raises(ReplError) as failed:
            await handle.start()
        message = str(failed.value)
        assert message.startswith("the REPL worker did not start: the worker process exited with status 1")
        assert "FileNotFoundError" in message and str(workspace.workdir) in message, message
    finally:
        await handle.close()
        workspace.remove()
        await backend.close()


async def test_a_worker_gone_for_a_while_is_not_killed_by_a_pid_another_process_has_now(repl: Cells) -> None:
    """A session's worker that ends while the session is idle (the kernel's OOM killer takes workers first, or the
    run's code made it exit) is reaped by the zygote, and its pid given to the next process that starts once pids
    wrap around (32,768 of them by default). Ending the session later killed the worker's process group by that
    pid. Old behaviour caught: the process group that had the pid now, here a process of this test's (another
    run's worker, or any process of the host, the server being root), was killed."""
    worker = repl.repl._worker  # type: ignore[attr-defined]
    outcome = await repl.execute("import os, threading\nthreading.Timer(0.2, os._exit, [0]).start()", 10)
    assert outcome.error is None, outcome
    assert await asyncio.wait_for(worker.process.wait(), 10) == 0  # reported ended by the zygote: its pid is free
    other = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)  # a group's leader
    try:
        worker.process.pid = other.pid  # as if the kernel had given the worker's pid to it
        await repl.close()  # the session ends
    finally:
        with contextlib.suppress(ProcessLookupError):
            other.terminate()  # ended by this, it was left alone
    assert await other.wait() == -signal.SIGTERM, "another process's group was killed"


async def test_a_worker_ends_with_its_zygote(repl: Cells) -> None:
    """A worker gets SIGKILL when the zygote that forked it dies, so none outlives it (the zygote's own end kills
    them all; a zygote killed cannot). Old behaviour, with a uid of its own (a root server): the uid switch
    cleared the parent-death signal, and the worker went on serving cells with the run's input in memory."""
    pid = repl.repl._worker.process.pid  # type: ignore[attr-defined]
    zygote = next(process.ppid for process in descendants() if process.pid == pid)
    os.kill(zygote, signal.SIGKILL)
    assert wait_until(lambda: pid not in worker_processes(), timeout=10)


async def test_a_worker_stopped_between_runs_is_told_to_the_next_run_only(backend: SubprocessBackend) -> None:
    """A session's worker stopped by the disk watch while the session is idle (a thread of its last cell went on
    writing): the next run is told why its variables are gone, and a cell of that run which times out later is
    told it timed out. Old behaviour: the next run read "killed by signal 9", and the disk's reason waited, to be
    given to the next cell that lost its worker (here: a timeout reported as DiskLimit)."""
    workspace = Workspace.create()
    workspace.write_input("abc")
    cells = Cells(backend.make(workspace, ReplOptions(memory_mb=1024, disk_mb=1)), workspace)
    try:
        await cells.repl.start()
        worker = cells.repl._worker  # type: ignore[attr-defined]
        writes_later = (
            "import threading, time\n"
            "def write():\n"
            "    time.sleep(0.3)\n"
            "    for name in 'ab':\n"
            "        open(name, 'wb').write(b'x' * 700_000)\n"
            "threading.Thread(target=write).start()"
        )
        assert (await cells.execute(writes_later, 10)).error is None
        async with asyncio.timeout(30):
            await worker.process.wait()
        start = await cells.repl.begin_run(10)
        assert start.restarted is not None and start.restarted.startswith("DiskLimit"), start
        outcome = await cells.execute("while True:\n    pass", 1)
        assert outcome.error is not None and outcome.error.startswith("TimeoutError"), outcome.error
    finally:
        await cells.close()
        workspace.remove()


def _cancel_this_task() -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()


async def test_inprocess_repl_interrupts_a_python_loop() -> None:
    workspace = Workspace.create(isolate_uid=False)
    workspace.write_input("abc")
    handle = Cells(InprocessRepl(workspace, ReplOptions()), workspace)
    await handle.repl.start()
    await handle.execute("kept = 7", 10)
    outcome = await handle.execute("while True:\n    pass", 0.5)
    assert "TimeoutError" in (outcome.error or "")
    assert not outcome.restarted
    assert (await handle.execute("kept, len(context), llm_query('q')", 10)).stdout == "(7, 3, 'reply:q')"
    await handle.close()
    workspace.remove()


def test_load_text_reads_ascii_and_utf8(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    ascii_file = folder / "a.txt"
    ascii_file.write_bytes(b"plain ascii\n" * 1000)
    text = load_text(str(ascii_file))
    assert text == "plain ascii\n" * 1000 and hash(text) == hash("plain ascii\n" * 1000)
    utf8_file = folder / "u.txt"
    utf8_file.write_text("héllo → wörld\n", encoding="utf-8")
    assert load_text(str(utf8_file)) == "héllo → wörld\n"
    empty = folder / "e.txt"
    empty.write_bytes(b"")
    assert load_text(str(empty)) == ""


async def test_a_large_reply_waiting_for_room_is_not_overtaken_by_smaller_ones() -> None:
    """The run's budget of held bytes serves in order: a reply that needs the whole budget waits for the
    requests ahead of it, and smaller ones arriving after it wait behind it. Old behaviour: each waiter took
    room as soon as it fitted, so a cell whose threads kept small requests in flight could hold a large reply
    back for ever."""
    budget = _Budget(10)
    await budget.take(4)  # a request in flight
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    large = asyncio.ensure_future(take("large", 10))
    await asyncio.sleep(0.01)
    small = asyncio.ensure_future(take("small", 1))
    await asyncio.sleep(0.01)
    assert order == []  # the small one fits, but the large one came first
    budget.give(4)
    await large
    assert order == ["large"] and not small.done()
    budget.give(10)
    await small
    assert order == ["large", "small"] and budget.used == 1


async def test_a_cancelled_wait_for_room_lets_the_next_in_line_through() -> None:
    budget = _Budget(10)
    await budget.take(8)
    stuck = asyncio.ensure_future(budget.take(5))
    behind = asyncio.ensure_future(budget.take(2))
    await asyncio.sleep(0.01)
    assert not behind.done()
    stuck.cancel()
    assert await behind == 2 and budget.used == 10


async def test_a_message_cut_midway_gives_its_reservation_back() -> None:
    """A worker dies while the server reads its request: what the request reserved of the run's budget goes back.
    Old behaviour caught (the review): it stayed taken for the REPL's life, a session's later runs included, and a
    reply that needs the whole budget (now first in line) blocked every request after it."""
    budget = _Budget(100)
    data = b"".join(protocol.encode({"op": "batch", "id": 1}, ["a" * 40, "b" * 40]))
    reader = asyncio.StreamReader()
    reader.feed_data(data[:-10])
    reader.feed_eof()

    async def reserve(head: dict[str, Any], size: int) -> int:
        return await budget.take(size)

    with pytest.raises(protocol.ChannelClosed):
        await protocol.read_message(reader, reserve, budget.give)
    assert budget.used == 0


async def test_a_burst_of_spawns_faster_than_the_zygote_reads_them_all_get_a_worker(
    zygote: Zygote, tmp_path: Path
) -> None:
    """Spawn requests go to the zygote over a socket that holds a few hundred kilobytes of them (a hundred or so
    with a large environment); a burst larger than that, sent faster than the zygote forks, filled it. Old
    behaviour caught: the spawns past it failed with BlockingIOError (their runs ended with an internal error)."""
    await zygote.start()
    environment = {"PADDING": "x" * 4000}  # a socket's worth in a few dozen requests
    spawned = await asyncio.wait_for(
        asyncio.gather(*(zygote.spawn(tmp_path / "missing", environment) for _ in range(300))), 120
    )
    for worker in spawned:
        worker.channel.close()
        os.close(worker.stderr)
    async with asyncio.timeout(60):
        assert {await worker.wait() for worker in spawned} == {1}  # each forked, and ended at its missing directory


async def test_spawns_waiting_for_room_fail_at_once_when_the_zygote_goes(zygote: Zygote, tmp_path: Path) -> None:
    """Spawns waiting for room on the zygote's socket when the zygote goes (here: closed, as at the server's stop)
    fail at once, not at their 30 s timeout."""
    await zygote.start()
    environment = {"PADDING": "x" * 4000}
    spawns = [asyncio.ensure_future(zygote.spawn(tmp_path / "missing", environment)) for _ in range(300)]
    await asyncio.sleep(0)  # every spawn has sent its request or waits for room
    await zygote.close()
    async with asyncio.timeout(10):
        outcomes = await asyncio.gather(*spawns, return_exceptions=True)
    assert {type(outcome) for outcome in outcomes} <= {WorkerProcess, SpawnError}
    assert any(isinstance(outcome, SpawnError) for outcome in outcomes)
    for outcome in outcomes:
        if isinstance(outcome, WorkerProcess):
            outcome.channel.close()
            os.close(outcome.stderr)
