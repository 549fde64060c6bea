"""Sessions: a run's REPL kept after the run, so that follow-up questions find every variable it made.

A run started with `settings.session` hands its workspace and REPL to a `Session` when it ends instead of
closing them; `POST /process` with the session's id then starts a follow-up run on that REPL. The root
model of a follow-up is told the earlier questions and their final answers and which variables exist,
never the input itself. A session ends when it is deleted, when it has been idle for RLM_SESSION_IDLE_S,
or when it is the longest idle one and a new session needs its place (RLM_MAX_SESSIONS); ending it kills
its worker and removes its workspace (its input included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from .capacity import Capacity
from .repl.base import Repl
from .repl.workspace import Workspace
from .store import shown_id

log = logging.getLogger("rlm_service")

SWEEP_INTERVAL_S = 30.0
ANSWER_CHARS_SHOWN = 2000
"""Characters of each earlier answer that a follow-up's root model is shown (and that the session keeps)."""
TURNS_SHOWN = 20
"""Earlier questions (the latest) that a follow-up's root model is shown, with their answers; a session keeps the
text of those only, and of the others their run's id."""


class SessionUnavailable(Exception):
    """A follow-up cannot start: `status` is 404 (no such session, or it ended) or 409 (a run of it is live)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def no_session(session_id: str, idle_s: float) -> str:
    """Why a session is not there, in the same words whichever process or store answers."""
    return (
        f"no session {shown_id(session_id)}: it never existed, was deleted, or ended after {idle_s:g} s idle "
        "(RLM_SESSION_IDLE_S); start a new run with the input and settings.session"
    )


@dataclass
class Turn:
    """One question of a session and how it ended: the first ANSWER_CHARS_SHOWN characters of its answer, and how
    long the answer was."""

    run_id: str
    prompt: str
    answer: str = ""
    ready: bool = False
    answer_chars: int = 0

    @classmethod
    def of(cls, run_id: str, prompt: str, answer: str, ready: bool) -> Turn:
        return cls(run_id, prompt, answer[:ANSWER_CHARS_SHOWN], ready, len(answer))


@dataclass
class Session:
    """A REPL (its worker and workspace) kept between the runs of one conversation."""

    id: str
    repl: Repl
    workspace: Workspace
    input_chars: int
    input_lines: int
    input_kind: str
    preview: str
    turns: list[Turn] = field(default_factory=list)
    live_run: str | None = None
    last_used: float = field(default_factory=time.time)
    lost: str | None = None
    """Why the REPL had to be restarted since the last run (its worker died): the variables are gone."""

    def shown_turns(self) -> list[Turn]:
        """The latest TURNS_SHOWN questions: those a follow-up's root model is told about."""
        return self.turns[-TURNS_SHOWN:]

    def expires_at(self, idle_s: float) -> float:
        return self.last_used + idle_s

    def describe(self, idle_s: float) -> dict[str, object]:
        return {
            "id": self.id,
            "runs": [turn.run_id for turn in self.turns],
            "live_run": self.live_run,
            "expires_at": self.expires_at(idle_s),
            "input": {"chars": self.input_chars, "lines": self.input_lines},
        }


@dataclass
class Opening:
    """A session its first run will keep when it ends, while that run is live: its id is in the run's `start`
    event already, so a client may ask about it, or follow it up, before the session is kept."""

    run_id: str
    input_chars: int
    input_lines: int
    since: float = field(default_factory=time.time)


class SessionDirectory(Protocol):
    """Where the other processes of the instance find this process's sessions (fleet.py)."""

    def opened(self, session_id: str, run_id: str, input_chars: int, input_lines: int) -> None:
        """A run that will keep its REPL as this session started."""

    def saved(self, session: Session) -> None:
        """The session changed: kept, claimed by a run, released by it."""

    def ended(self, session_id: str) -> None:
        """The session ended (or was not kept after all)."""

    async def end_idle_sibling_session(self) -> None:
        """End the longest idle session that another process of this instance keeps (one counted in the same
        RLM_MAX_SESSIONS), if there is one."""


class SessionManager:
    """The sessions of this server process: created by runs, found by id, ended when idle or evicted."""

    def __init__(self, *, idle_s: float, capacity: Capacity) -> None:
        """`capacity`: RLM_MAX_SESSIONS, counted over every process of the instance."""
        self.idle_s = idle_s
        self.capacity = capacity
        self.directory: SessionDirectory | None = None
        """Set when other processes serve this instance too (fleet.py)."""
        self._sessions: dict[str, Session] = {}
        self._opening: dict[str, Opening] = {}
        """The sessions announced by a live first run (`announce`), not yet kept (`add`) or given up (`unreserve`)."""
        self._closing: set[asyncio.Future[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def new_id(self) -> str:
        return "s" + uuid.uuid4().hex[:15]

    def __len__(self) -> int:
        return len(self._sessions)

    def reserve(self) -> None:
        """Room for one more session, made by ending this process's longest idle one if the instance is
        full; raises `SessionUnavailable` (429) when none can end. Give it back with `unreserve`, or use it
        with `add`."""
        while not self.capacity.try_take():
            idle = [s for s in self._sessions.values() if s.live_run is None]
            if not idle:
                raise SessionUnavailable(
                    429,
                    f"{self.capacity.limit} sessions are kept (RLM_MAX_SESSIONS) and "
                    "none is idle; delete one (DELETE /api/sessions/{id}) or retry later",
                )
            oldest = min(idle, key=lambda s: s.last_used)
            log.info(
                "session %s ended: the longest idle when RLM_MAX_SESSIONS (%d) were kept",
                oldest.id,
                self.capacity.limit,
            )
            self._forget(oldest)
            self._close_soon(oldest)

    async def make_room(self) -> None:
        """Before `reserve` in a process of several: when the instance keeps RLM_MAX_SESSIONS sessions and
        none of this process's is idle, the longest idle one another process keeps ends to make room (as this
        process's own would; `reserve` alone would refuse the new session, whichever process was idle)."""
        if (
            self.directory is not None
            and self.capacity.shared
            and self.capacity.used >= self.capacity.limit
            and all(session.live_run is not None for session in self._sessions.values())
        ):
            await self.directory.end_idle_sibling_session()

    def announce(self, session_id: str, run_id: str, input_chars: int, input_lines: int) -> None:
        """The run `run_id` will keep its REPL as `session_id` (in the room `reserve` made)."""
        self._opening[session_id] = Opening(run_id, input_chars, input_lines)
        if self.directory is not None:
            self.directory.opened(session_id, run_id, input_chars, input_lines)

    def unreserve(self, session_id: str) -> None:
        """The announced session was not kept after all."""
        self._opening.pop(session_id, None)
        self.capacity.give()
        if self.directory is not None:
            self.directory.ended(session_id)

    def add(self, session: Session) -> None:
        """Keep a session, in the room `reserve` made for it."""
        self._opening.pop(session.id, None)
        self._sessions[session.id] = session
        self._start_sweeper()
        if self.directory is not None:
            self.directory.saved(session)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def live_run(self, session_id: str) -> str | None:
        """The live run of a session of this process: a follow-up's, or the first run's while it is live."""
        session = self._sessions.get(session_id)
        opening = self._opening.get(session_id)
        return session.live_run if session is not None else opening.run_id if opening is not None else None

    def describe(self, session_id: str) -> dict[str, object] | None:
        """A session of this process as `GET /api/sessions/{id}` shows it (one whose first run is live too);
        None if there is none."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session.describe(self.idle_s)
        opening = self._opening.get(session_id)
        if opening is None:
            return None
        return {
            "id": session_id,
            "runs": [],
            "live_run": opening.run_id,
            "expires_at": opening.since + self.idle_s,
            "input": {"chars": opening.input_chars, "lines": opening.input_lines},
        }

    def claim(self, session_id: str, run_id: str) -> Session:
        """The session, marked as running `run_id`; raises `SessionUnavailable` (404, 409)."""
        session = self._sessions.get(session_id)
        if session is None and (opening := self._opening.get(session_id)) is not None:
            raise SessionUnavailable(
                409,
                f"run {opening.run_id} of session {session_id} is still going (the session is kept when it "
                "ends); follow it (GET /api/runs/{id}/events) or cancel it first",
            )
        if session is None:
            raise SessionUnavailable(404, no_session(session_id, self.idle_s))
        if session.live_run is not None:
            raise SessionUnavailable(
                409,
                f"run {session.live_run} of session {session_id} is still going; "
                "follow it (GET /api/runs/{id}/events) or cancel it first",
            )
        session.live_run = run_id
        session.last_used = time.time()
        if self.directory is not None:
            self.directory.saved(session)
        return session

    def release(self, session: Session, turn: Turn) -> None:
        """A run of the session ended: record its question and answer, and start its idle time. A question no
        longer shown to follow-ups (TURNS_SHOWN) is kept as its run's id only."""
        session.turns.append(turn)
        if len(session.turns) > TURNS_SHOWN:
            hidden = session.turns[-TURNS_SHOWN - 1]
            hidden.prompt = hidden.answer = ""
        session.live_run = None
        session.last_used = time.time()
        if self.directory is not None and session.id in self._sessions:
            self.directory.saved(session)

    async def end(self, session_id: str, *, wait: bool = True) -> bool:
        """End a session: its worker is killed and its workspace removed (with `wait`, before this returns;
        either way `close` waits for it). False if there was none."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._forget(session)
        closing = self._close_soon(session)
        if wait:
            # shielded: a caller cancelled meanwhile (the sweeper at a stop) leaves the close going, and `close`
            # waits for it; cut short, it would leave the session's input on disk and its uid taken
            await asyncio.shield(closing)
        return True

    def _forget(self, session: Session) -> None:
        del self._sessions[session.id]
        self.capacity.give()
        if self.directory is not None:
            self.directory.ended(session.id)

    def _close_soon(self, session: Session) -> asyncio.Future[None]:
        closing = asyncio.ensure_future(self._close(session))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        return closing

    @staticmethod
    async def _close(session: Session) -> None:
        with contextlib.suppress(Exception):
            await session.repl.close()
        try:
            await asyncio.to_thread(session.workspace.remove)  # in a thread, as a run's: it may hold many files
        except Exception:  # (its close may be awaited by no one)
            log.exception("session %s: its files could not be removed", session.id)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="rlm-session-sweeper")

    async def _sweep_forever(self) -> None:
        while self._sessions:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self.idle_s / 4))
            try:
                await self.sweep()
            except Exception:  # the next sweep tries again
                log.exception("ending idle sessions failed")

    async def sweep(self) -> None:
        """End the sessions idle for longer than RLM_SESSION_IDLE_S."""
        now = time.time()
        for session in list(self._sessions.values()):
            if session.live_run is None and now >= session.expires_at(self.idle_s):
                log.info("session %s ended after %.0f s idle", session.id, now - session.last_used)
                await self.end(session.id)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for session_id in list(self._sessions):
            await self.end(session_id)
        await asyncio.gather(*self._closing, return_exceptions=True)
