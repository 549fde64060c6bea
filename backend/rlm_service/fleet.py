"""This server process among the others that serve one instance: several processes on one port
(`WEB_CONCURRENCY`, sharing the SQLite history) or replicas on one PostgreSQL database (`RLM_DATABASE_URL`).

The database is the coordinator; the processes never reach each other over the network (replicas on Render or
Railway cannot address each other). What each process does:
- It registers in `processes` and heartbeats; processes that stop heartbeating are ended by the others'
  sweepers, their live runs as `lost` (pulse.py).
- It carries out the commands other processes leave for it (`commands`; on PostgreSQL announced by `NOTIFY
  rlm_commands, '<process id>'`, on SQLite polled every 200 ms): cancel one of its runs, end one of its
  sessions, start a follow-up on one of its sessions under a run id the asking process chose. The asking
  process streams that run to its client through the database (followers.py), as it follows any run of
  another process.
- It keeps its sessions' rows (`sessions`) up to date, so that any process can answer `GET /api/sessions/{id}`
  and knows where to send a follow-up.
- On a clean stop, once its runs have ended (cancelled) and their events are written, it deletes its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import HTTPException

from . import fleet_sql as sql
from .engine import SCHEMA_CHECKED, RunSettings, SettingsRefused
from .events import Event, is_terminal
from .followers import POLL_SQLITE_S, POLL_WITHOUT_LISTENER_S, RECHECK_S, Listener, StoreFollower, Wakeups
from .pulse import Pulse
from .repl.procstat import stat_fields
from .runs import LiveRun
from .sessions import Session, SessionUnavailable, no_session
from .store import StoreUnavailable, off_loop
from .store_postgres import PostgresRunStore
from .store_sql import SqlRunStore
from .storewriter import Db

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Engine

log = logging.getLogger("rlm_service")

T = TypeVar("T")
Launch = Callable[[str, RunSettings, str, str], LiveRun]
"""Starts a follow-up run here, taking its slot: (prompt, settings, session id, run id)."""
ANSWER_WAIT_S = 5.0
"""How long a process waits for another to take (and answer) a follow-up or the end of a session."""
ANSWER_POLL_S = 0.05
CLAIMED_WAIT_S = 20.0
"""How long after sending a follow-up a process waits for its answer once the other process has claimed it, i.e.
is starting its run (`sql.claim`); an unclaimed command is given up on after twice ANSWER_WAIT_S."""
STOP_WAIT_S = 10.0
SIBLING_TRIES = 3
"""Idle sessions of other processes asked to end, one after another, to make room for a new one."""
UNKNOWN_TRIES, UNKNOWN_POLL_S = 10, 0.1
"""A run unknown to the database is looked up again this many times, this far apart: another process may have
only just started it, its first write still on the way."""


class Fleet:
    """This process's part: `start()` registers it and starts its loops, `stop()` ends them and its rows. The
    routes use `cancel`, `live_elsewhere`, `follow`, `owned`, `session`, `end_session` and `follow_up` for what
    another process holds."""

    def __init__(self, settings: Settings, store: SqlRunStore, engine: Engine, launch: Launch) -> None:
        self.store = store
        self.engine = engine
        self.launch = launch
        self.idle_s = settings.rlm_session_idle_s
        self.wakeups = Wakeups()
        self.pulse = Pulse(
            store,
            timeout_s=settings.rlm_replica_timeout_s,
            idle_s=self.idle_s,
            wake=self._wake_soon,
            taken_for_dead=self._taken_for_dead_soon,
        )
        self.listener = (
            Listener(store.listening_connection, (sql.EVENTS_CHANNEL, sql.COMMANDS_CHANNEL), self.wakeups)
            if isinstance(store, PostgresRunStore)
            else None
        )
        self.follower = StoreFollower(store, self.wakeups, self._poll_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._errands: set[asyncio.Future[Any]] = set()

    @property
    def id(self) -> str:
        """This process's id among the others (it changes if it is taken for dead and registers anew)."""
        return self.pulse.id

    async def start(self) -> None:
        """Register (raises `StoreUnavailable` when the database cannot be reached) and start the loops."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.pulse.start)
        self.engine.sessions.directory = self
        self._tasks = [asyncio.create_task(self._commands(), name="rlm-fleet-commands")]
        self._tasks[0].add_done_callback(_loop_ended)
        if self.listener is not None:
            self._tasks.append(asyncio.create_task(self.listener.run(), name="rlm-fleet-listener"))
        log.info(
            "server process %s (pid %d) coordinates with the others through the %s database",
            self.id,
            os.getpid(),
            self.store.dialect,
        )

    async def stop(self) -> None:
        """After the engine has ended its runs and sessions: write their last events, then delete this process's
        rows (while the database can be reached; otherwise the others end its runs as lost)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._errands, return_exceptions=True)
        self.engine.sessions.directory = None
        # default threads, not the store's (`off_loop`): these waits have their own limits and must not queue
        # behind history reads that a database which stopped answering holds
        await asyncio.to_thread(self.store.flush, STOP_WAIT_S)
        await asyncio.to_thread(self.pulse.stop, STOP_WAIT_S)

    def _wake_soon(self, keys: list[str]) -> None:
        """From the pulse's thread: news of these runs (or of this process's commands)."""
        if self._loop is not None:
            for key in keys:
                self._loop.call_soon_threadsafe(self.wakeups.wake, key)

    def _taken_for_dead_soon(self) -> None:
        """From the pulse's thread: the others ended this process's runs and sessions as lost."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._errand(self._taken_for_dead()))

    async def _taken_for_dead(self) -> None:
        for run in self.engine.runs.live():
            run.cancel("this server process lost touch with the database and was taken for dead")
        await self.engine.sessions.close()

    # --- commands from other processes ---------------------------------------------------------------------

    async def _commands(self) -> None:
        while True:
            me = self.id
            with self.wakeups.watch(me) as woken:
                woken.clear()
                commands = await self._take_commands(me)
                for command in commands:
                    try:
                        await self._carry_out(command)
                    except Exception:  # a command that fails (one malformed, say) stops no later one
                        log.exception("a %s command from another process failed", command.kind)
                        await self._failed(command)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self._poll_s(commands=True))

    async def _take_commands(self, me: str) -> list[sql.Command]:
        try:
            if not await off_loop(self.store.query, lambda db: sql.pending(db, me)):
                return []
            return await off_loop(self.store.transaction, lambda db: sql.take(db, me))
        except StoreUnavailable as exc:
            log.debug("commands: %s", exc)
            return []
        except Exception:  # (an error of the database other than its being unreachable): tried again next time
            log.exception("the commands of other processes could not be read")
            return []

    async def _failed(self, command: sql.Command) -> None:
        """After a command failed: a follow-up's run, if it started, is cancelled (its sender will not follow it),
        and the sender is told (500), or the command removed if no one waits for an answer."""
        run = self.engine.runs.get(str(command.payload.get("run_id"))) if command.kind == "follow_up" else None
        if run is not None:
            run.cancel("the command that started this follow-up failed")
        failed = {"status": 500, "detail": f"the {command.kind} command failed"}
        replied = command.payload.get("reply", True)
        try:
            await off_loop(
                self.store.transaction,
                lambda db: sql.answer(db, command.id, failed) if replied else sql.remove(db, command.id),
            )
        except Exception as exc:  # the sweep removes it; its sender gives up
            log.warning("a failed %s command could not be answered: %r", command.kind, exc)

    async def _carry_out(self, command: sql.Command) -> None:
        payload = command.payload
        if command.kind == "cancel":
            run = self.engine.runs.get(str(payload["run_id"]))
            cancelled = run is not None and run.cancel(str(payload.get("reason") or "cancelled through the API"))
            outcome = {"status": 202 if cancelled else 409}  # 409: the run had ended first
            with contextlib.suppress(StoreUnavailable):  # (the sweep removes it then)
                if payload.get("reply", True):  # (senders of earlier versions all wait)
                    await off_loop(self.store.transaction, lambda db: sql.answer(db, command.id, outcome))
                else:  # no one waits for the answer
                    await off_loop(self.store.transaction, lambda db: sql.remove(db, command.id))
            return
        if command.kind == "end_session":
            result = await self._end_here(str(payload["session_id"]))
        elif command.kind == "follow_up":
            # Claimed first: a run started for a sender that gave up meanwhile would have to be cancelled, and a
            # cancel as it starts (listing the session's variables) costs the session its worker.
            try:
                claimed = await off_loop(self.store.transaction, lambda db: sql.claim(db, command.id))
            except StoreUnavailable as exc:
                log.warning("a follow-up command could not be claimed: %s", exc)
                return
            if not claimed:
                return
            result = self._follow_up_here(payload)
        else:
            result = {"status": 400, "detail": f"unknown command {command.kind!r}"}
        try:
            heard = await off_loop(self.store.transaction, lambda db: sql.answer(db, command.id, result))
        except StoreUnavailable as exc:
            log.warning("a %s command could not be answered: %s", command.kind, exc)
            heard = False
        if not heard and command.kind == "follow_up" and result["status"] == 200:
            # Its sender answered its client (503) without the run's id: no one would follow or cancel the run.
            run = self.engine.runs.get(str(payload["run_id"]))
            if run is not None:
                run.cancel("the server process that asked for this follow-up stopped waiting for it")

    async def _end_here(self, session_id: str) -> dict[str, Any]:
        if (live := self.engine.sessions.live_run(session_id)) is not None:
            return {"status": 409, "detail": f"run {live} of this session is live; cancel it first"}
        if self.engine.sessions.get(session_id) is None:
            return {"status": 404, "detail": no_session(session_id, self.idle_s)}
        # not waiting for its worker and files to go: this process's other commands wait meanwhile
        await self.engine.sessions.end(session_id, wait=False)
        return {"status": 204}

    def _follow_up_here(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            run_settings = RunSettings.model_validate(payload["settings"], context={SCHEMA_CHECKED: True})
            self.launch(str(payload["prompt"]), run_settings, str(payload["session_id"]), str(payload["run_id"]))
        except SessionUnavailable as exc:
            return {"status": exc.status, "detail": str(exc)}
        except SettingsRefused as exc:
            return {"status": 422, "detail": str(exc)}
        except HTTPException as exc:  # no run slot left here (429)
            return {"status": exc.status_code, "detail": str(exc.detail)}
        except Exception as exc:
            log.exception("a follow-up sent by another process could not start")
            return {"status": 500, "detail": f"the follow-up could not start: {type(exc).__name__}"}
        return {"status": 200}

    # --- what the routes ask of other processes ------------------------------------------------------------

    async def cancel(
        self, run_id: str, reason: str = "cancelled through the API", *, wait: bool = False
    ) -> Literal["unknown", "ended", "cancelling"]:
        """Ask the process that runs `run_id` to cancel it. With `wait`, until that process has done it: "ended"
        if the run ended first (a cancel answered 202 must end the run with `cancelled`), "cancelling" once
        cancelled. A process that died before it answered is known to be dead within RLM_REPLICA_TIMEOUT_S, when
        its run ends as `lost`: "ended" then; "cancelling" if the run still runs after that long."""
        dialect = self.store.dialect

        def send(db: Db) -> tuple[Literal["unknown", "ended", "cancelling"], str]:
            found = sql.run_owner(db, run_id)
            if found is None:
                return "unknown", ""
            status, owner = found
            if status != "running" or owner is None:
                return "ended", ""
            payload = {"run_id": run_id, "reason": reason, "reply": wait}
            return "cancelling", sql.send(db, dialect, owner, "cancel", payload)

        for _ in range(UNKNOWN_TRIES):  # a run only just started may not be written yet
            sent, command_id = await off_loop(self.store.transaction, send)
            if sent == "cancelling" and wait:
                return await self._cancelled(command_id, run_id)
            if sent != "unknown":
                return sent
            await asyncio.sleep(UNKNOWN_POLL_S)
        return "unknown"

    async def _cancelled(self, command_id: str, run_id: str) -> Literal["ended", "cancelling"]:
        deadline = time.monotonic() + ANSWER_WAIT_S + self.pulse.timeout_s

        async def past_deadline(state: str) -> bool:
            return time.monotonic() >= deadline

        result = await self._answer(command_id, past_deadline)
        if result is not None:
            return "ended" if result.get("status") == 409 else "cancelling"
        # No answer: the owner died (the sweep removed the command, and ended the run as `lost`), or is stuck.
        return "cancelling" if await off_loop(self.store.status, run_id) == "running" else "ended"

    async def live_elsewhere(self, run_id: str) -> bool:
        """Whether the run is live (in another process: this one's are in its registry). A run another process
        has only just started may not be written yet: an unknown run is looked up again for a moment."""
        for _ in range(UNKNOWN_TRIES):
            status = await off_loop(self.store.status, run_id)
            if status is not None:
                return status == "running"
            await asyncio.sleep(UNKNOWN_POLL_S)
        return False

    def cancel_soon(self, run_id: str, reason: str) -> None:
        """`cancel`, without waiting for the database."""
        self._errand(self.cancel(run_id, reason))

    def follow(self, run_id: str, after: int = 0) -> AsyncIterator[Event]:
        """A run another process runs, through the database, up to its terminal event."""
        return self.follower.follow(run_id, after)

    async def owned(self, run_id: str, *, detached: bool) -> AsyncIterator[Event]:
        """The stream of the connection that asked for a follow-up another process runs: leaving it before the
        end cancels the run, unless it is detached."""
        ended = False
        try:
            async for event in self.follower.follow(run_id):
                ended = is_terminal(event)
                yield event
        finally:
            if not detached and not ended:
                self._errand(self.cancel(run_id, "the client disconnected"))

    async def session(self, session_id: str) -> dict[str, Any]:
        """A session another process keeps, as `GET /api/sessions/{id}` shows it; `SessionUnavailable` (404)."""
        row = await self._find_session(session_id)
        return {
            "id": row.id,
            "runs": row.runs,
            "live_run": row.live_run,
            "expires_at": row.last_used + self.idle_s,
            "input": {"chars": row.input_chars, "lines": row.input_lines},
        }

    async def end_session(self, session_id: str) -> None:
        """Ask the process that keeps a session to end it; `SessionUnavailable` (404, 409) as it answers."""
        row = await self._find_session(session_id)
        assert row.owner is not None
        result = await self._ask(row.owner, "end_session", {"session_id": session_id}, session_id)
        if result["status"] != 204:
            raise SessionUnavailable(int(result["status"]), str(result.get("detail")))

    async def follow_up(self, prompt: str, settings: RunSettings, session_id: str) -> str:
        """Start a follow-up on a session another process keeps (that process runs it); its run id. Raises
        `SessionUnavailable` with the status that process answered (404, 409, 429…)."""
        row = await self._find_session(session_id)
        assert row.owner is not None
        run_id = uuid.uuid4().hex[:16]
        payload = {
            "prompt": prompt,
            "settings": settings.model_dump(exclude_none=True),
            "session_id": session_id,
            "run_id": run_id,
        }
        result = await self._ask(row.owner, "follow_up", payload, session_id)
        if result["status"] != 200:
            raise SessionUnavailable(int(result["status"]), str(result.get("detail")))
        return run_id

    async def _find_session(self, session_id: str) -> sql.SessionRow:
        dialect = self.store.dialect
        row = await off_loop(
            self.store.query, lambda db: sql.find_session(db, dialect, session_id, self.pulse.dead_after_s)
        )
        if row is None:
            raise SessionUnavailable(404, no_session(session_id, self.idle_s))
        if row.gone is not None or row.owner is None or not row.owner_alive:
            why = row.gone or "the server process that kept it died"
            raise SessionUnavailable(
                404, f"session {session_id} is gone: {why}; start a new run with the input and settings.session"
            )
        return row

    async def _ask(self, target: str, kind: str, payload: dict[str, Any], session_id: str) -> dict[str, Any]:
        """Leave a command for `target` and wait for its answer. Not taken within ANSWER_WAIT_S: withdrawn; taken
        but not answered within twice that: given up, unless the target has claimed it (a follow-up whose run it is
        starting: `sql.claim`), which is waited for up to CLAIMED_WAIT_S; a target answering a command given up on
        cancels the run it started. Either way the session is reported gone (its process died) or busy (it is
        alive but did not answer)."""
        dialect = self.store.dialect
        command_id = await off_loop(self.store.transaction, lambda db: sql.send(db, dialect, target, kind, payload))
        sent = time.monotonic()
        run_id = payload.get("run_id")

        async def unanswered(state: str) -> bool:
            waited = time.monotonic() - sent
            if state == "claimed":  # its answer may never come (the target could not write it)
                return waited >= CLAIMED_WAIT_S
            if state == "taken" and waited >= 2 * ANSWER_WAIT_S:
                return await off_loop(self.store.transaction, lambda db: sql.give_up(db, command_id))
            if state == "waiting" and waited >= ANSWER_WAIT_S:
                return await off_loop(self.store.transaction, lambda db: sql.withdraw(db, command_id))
            return False

        try:
            result = await self._answer(command_id, unanswered)
            # removed whatever its state, so that a target answering later learns that no one waits (and cancels a
            # run it started); an answer that came just before stands
            result = result or await off_loop(self.store.transaction, lambda db: sql.abandon(db, command_id))
        except BaseException:  # cancelled (the client left), or the database failed: no run must start unfollowed
            self._errand(self._abandon(command_id, run_id))
            raise
        if result is not None and result.get("status") != sql.STARTING:
            return result
        row = await self._find_session(session_id)  # 404 when its process died meanwhile
        return {
            "status": 503,
            "detail": f"the server process that keeps session {row.id} did not answer within "
            f"{ANSWER_WAIT_S:g} s; try again",
        }

    async def _abandon(self, command_id: str, run_id: str | None) -> None:
        """Take back a command whose sender stopped waiting: removed whatever its state (a target answering it later
        learns that no one waits, and cancels a run it started), and a follow-up that had started is cancelled."""
        result = await off_loop(self.store.transaction, lambda db: sql.abandon(db, command_id))
        if run_id is not None and result is not None and result.get("status") == 200:
            await self.cancel(run_id, "the client that asked for this follow-up stopped waiting for it")

    async def _answer(self, command_id: str, stop: Callable[[str], Awaitable[bool]]) -> dict[str, Any] | None:
        """Wait for a command's answer (its target has answered: the command is then removed), polling every
        ANSWER_POLL_S; None once the command is gone (its target died) or `stop(state)` gives up on it (state:
        "waiting", "taken", or "claimed": a follow-up whose run its target is starting, status STARTING)."""
        while True:
            await asyncio.sleep(ANSWER_POLL_S)
            state, result = await off_loop(self.store.query, lambda db: sql.outcome(db, command_id))
            if result is not None and result.get("status") != sql.STARTING:
                with contextlib.suppress(StoreUnavailable):  # left for the sweep: the answer stands
                    await off_loop(self.store.transaction, lambda db: sql.remove(db, command_id))
                return result
            if state == "gone" or await stop("claimed" if result is not None else state):
                return None

    # --- the session directory (SessionManager calls these) ------------------------------------------------

    def opened(self, session_id: str, run_id: str, input_chars: int, input_lines: int) -> None:
        now = time.time()
        self._save(
            sql.SessionRow(
                id=session_id,
                owner=self.id,
                created=now,
                last_used=now,
                live_run=run_id,
                input_chars=input_chars,
                input_lines=input_lines,
            )
        )

    def saved(self, session: Session) -> None:
        self._save(
            sql.SessionRow(
                id=session.id,
                owner=self.id,
                created=session.last_used,
                last_used=session.last_used,
                runs=[turn.run_id for turn in session.turns],
                live_run=session.live_run,
                input_chars=session.input_chars,
                input_lines=session.input_lines,
            )
        )

    def ended(self, session_id: str) -> None:
        me = self.id
        self.store.queue(lambda db: sql.drop_session(db, session_id, me))

    async def end_idle_sibling_session(self) -> None:
        """End the longest idle session of a process of this instance: one the same supervisor started on this
        machine (they count their sessions together, `capacity`; replicas count their own)."""
        dialect, me, dead_after_s = self.store.dialect, self.id, self.pulse.dead_after_s
        try:
            idle = await off_loop(self.store.query, lambda db: sql.idle_sessions(db, dialect, me, dead_after_s))
        except StoreUnavailable as exc:
            log.debug("sessions of the other processes: %s", exc)
            return
        siblings = [(session_id, owner) for session_id, owner, host, pid in idle if _sibling(host, pid)]
        for session_id, owner in siblings[:SIBLING_TRIES]:
            try:
                result = await self._ask(owner, "end_session", {"session_id": session_id}, session_id)
            except (SessionUnavailable, StoreUnavailable):
                continue
            if result["status"] == 204:
                log.info("session %s ended: the longest idle when RLM_MAX_SESSIONS were kept", session_id)
                return

    def _save(self, row: sql.SessionRow) -> None:
        self.store.queue(lambda db: sql.save_session(db, row))

    # --- plumbing ------------------------------------------------------------------------------------------

    def _poll_s(self, *, commands: bool = False) -> float:
        """How long to wait for news before reading anyway: SQLite has no notifications; PostgreSQL's come
        through the listener while it is up."""
        if self.listener is None:
            return POLL_SQLITE_S
        if not self.listener.up:
            return POLL_WITHOUT_LISTENER_S
        return self.pulse.timeout_s if commands else RECHECK_S

    def _errand(self, coroutine: Any) -> None:
        """Run `coroutine` on its own; its failure is logged (a cancel that could not be sent, say)."""
        task = asyncio.ensure_future(coroutine)
        self._errands.add(task)
        task.add_done_callback(self._errand_done)

    def _errand_done(self, task: asyncio.Future[Any]) -> None:
        self._errands.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("an errand for another process failed", exc_info=task.exception())


def _loop_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the loop carrying out other processes' commands stopped: %r", task.exception())


def _sibling(host: str, pid: int) -> bool:
    """Whether the process `pid` of `host` is one of this process's supervisor (`WEB_CONCURRENCY`)."""
    if host != socket.gethostname():
        return False
    return stat_fields(pid, 4) == (os.getppid(),)
