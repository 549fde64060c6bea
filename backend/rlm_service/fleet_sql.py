"""The SQL of the processes that share one database (fleet.py): who is alive, who runs and keeps what, and what
one asks another to do. Each function runs inside a transaction its caller opened (`SqlRunStore.atomically`, or
the heartbeat's own connection), on SQLite or PostgreSQL alike; only the clock and `NOTIFY` differ.

Heartbeats and their ages are read on the database's clock, so that replicas on machines whose clocks differ
judge each other by one clock.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from .events import ErrorEvent
from .migrations import PREVIEW_CHARS, Dialect
from .storewriter import Db

NOW: dict[Dialect, str] = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
}
"""The database's clock, in Unix seconds."""
EVENTS_CHANNEL = "rlm_events"
COMMANDS_CHANNEL = "rlm_commands"
"""PostgreSQL's channels: new events of a run (payload: the run's id), new commands (payload: the target)."""
COMMANDS_KEPT_S = 600.0
"""A command nobody removed (its sender died while waiting for the answer) is deleted after this long."""


@dataclass
class Command:
    """What a process is asked to do: `cancel` a run, `end_session`, or start a `follow_up`."""

    id: str
    kind: str
    payload: dict[str, Any]


@dataclass
class SessionRow:
    """A session as the other processes see it: who keeps it, and what `GET /api/sessions/{id}` shows."""

    id: str
    owner: str | None
    created: float
    last_used: float
    runs: list[str] = field(default_factory=list)
    live_run: str | None = None
    input_chars: int = 0
    input_lines: int = 0
    gone: str | None = None
    """Why the session is gone (its process died), for a session kept as a tombstone."""
    owner_alive: bool = True


def notify(db: Db, dialect: Dialect, channel: str, payloads: list[str]) -> None:
    """Tell the listening processes (PostgreSQL), once the transaction commits; SQLite's processes poll."""
    if dialect == "postgresql" and payloads:
        db.execute(f"SELECT pg_notify('{channel}', p) FROM unnest(CAST(? AS TEXT[])) AS p", (payloads,))


def register(db: Db, dialect: Dialect, process_id: str, host: str, pid: int) -> None:
    now = NOW[dialect]
    db.execute(
        f"INSERT INTO processes (id, host, pid, started, heartbeat) VALUES (?, ?, ?, {now}, {now})",
        (process_id, host, pid),
    )


def heartbeat(db: Db, dialect: Dialect, process_id: str) -> bool:
    """Record that the process is alive; False when its row is gone (another process took it for dead)."""
    return db.execute(f"UPDATE processes SET heartbeat = {NOW[dialect]} WHERE id = ?", (process_id,)) > 0


def unregister(db: Db, process_id: str) -> None:
    """A clean stop: the process's row, its sessions' rows and the commands still waiting for it."""
    db.execute("DELETE FROM sessions WHERE owner = ?", (process_id,))
    db.execute("DELETE FROM commands WHERE target = ?", (process_id,))
    db.execute("DELETE FROM processes WHERE id = ?", (process_id,))


def heartbeat_ages(db: Db, dialect: Dialect, me: str) -> list[tuple[str, float]]:
    """The other processes, each with the age of its last heartbeat in seconds."""
    rows = db.rows(f"SELECT id, {NOW[dialect]} - heartbeat AS age FROM processes WHERE id <> ?", (me,))
    return [(str(row["id"]), float(row["age"])) for row in rows]


def bury(db: Db, dialect: Dialect, process_id: str, older_than_s: float, timeout_s: float) -> list[str] | None:
    """End a dead process: its live runs as `lost`, its sessions as tombstones, its waiting commands dropped.
    Only the process whose transaction removes the dead one's row does it (None for the others). Returns the
    runs it ended."""
    gone = db.rows(
        f"DELETE FROM processes WHERE id = ? AND heartbeat < {NOW[dialect]} - ? RETURNING host, pid",
        (process_id, older_than_s),
    )
    if not gone:
        return None
    who = f"{gone[0]['host']}, pid {gone[0]['pid']}"
    message = (
        f"The run was lost: the server process that ran it ({who}) died; nothing was heard from it for "
        f"longer than RLM_REPLICA_TIMEOUT_S allows ({timeout_s:g} s)."
    )
    rows = db.rows("SELECT id FROM runs WHERE status = 'running' AND owner = ?", (process_id,))
    ended = [str(row["id"]) for row in rows if end_lost(db, dialect, str(row["id"]), message)]
    db.execute(  # a tombstone's `last_used` is its burial, by the database's clock (see `tidy`)
        f"UPDATE sessions SET gone = ?, owner = NULL, live_run = NULL, last_used = {NOW[dialect]} WHERE owner = ?",
        (f"the server process that kept it ({who}) died", process_id),
    )
    db.execute("DELETE FROM commands WHERE target = ?", (process_id,))
    notify(db, dialect, EVENTS_CHANNEL, ended)
    return ended


def orphans(db: Db, dialect: Dialect) -> list[str]:
    """End as `lost` the live runs whose process has no row (it stopped without being able to end them)."""
    rows = db.rows(
        "SELECT id FROM runs WHERE status = 'running' AND owner IS NOT NULL AND owner NOT IN (SELECT id FROM processes)"
    )
    message = "The run was lost: the server process that ran it stopped without ending it."
    ended = [str(row["id"]) for row in rows if end_lost(db, dialect, str(row["id"]), message)]
    notify(db, dialect, EVENTS_CHANNEL, ended)
    return ended


def end_lost(db: Db, dialect: Dialect, run_id: str, message: str) -> bool:
    """Append the run's terminal event, `error` code `lost` (with the answer it had started, if any), and close
    its record; False if the run is no longer live (another process ended it first), or (PostgreSQL) a write of
    its events is in progress: its process is not dead then, and a later sweep decides."""
    if dialect == "postgresql" and not db.rows(
        "SELECT 1 AS live FROM runs WHERE id = ? AND status = 'running' FOR UPDATE SKIP LOCKED", (run_id,)
    ):
        return False
    rows = db.rows("SELECT data FROM events WHERE run_id = ? AND type = 'answer' ORDER BY seq DESC LIMIT 1", (run_id,))
    answer = str(json.loads(rows[0]["data"]).get("content") or "") or None if rows else None
    error = json.dumps({"code": "lost", "message": message})
    closed = db.execute(
        "UPDATE runs SET status = 'lost', finished = ?, error = ?, answer_preview = ?, "
        "answer_chars = ? WHERE id = ? AND status = 'running'",
        (
            time.time(),
            error,
            None if answer is None else answer[:PREVIEW_CHARS],
            None if answer is None else len(answer),
            run_id,
        ),
    )
    if not closed:
        return False
    seq = int(db.rows("SELECT COALESCE(MAX(seq), 0) AS seq FROM events WHERE run_id = ?", (run_id,))[0]["seq"]) + 1
    event = ErrorEvent(run_id=run_id, code="lost", message=message, answer=answer, seq=seq)
    db.execute(
        "INSERT INTO events (run_id, seq, type, data) VALUES (?, ?, ?, ?)",
        (run_id, seq, event.type, event.model_dump_json()),
    )
    return True


def tidy(db: Db, dialect: Dialect, idle_s: float) -> None:
    """Forget the commands nobody removed, and the tombstones of sessions buried longer ago than a session may
    stay idle; both by the database's clock, as they were stamped (a replica whose clock runs ahead must not
    remove the others' commands as they come, or a tombstone as it is made)."""
    db.execute(f"DELETE FROM commands WHERE created < {NOW[dialect]} - ?", (COMMANDS_KEPT_S,))
    db.execute(f"DELETE FROM sessions WHERE gone IS NOT NULL AND last_used < {NOW[dialect]} - ?", (idle_s,))


def run_owner(db: Db, run_id: str) -> tuple[str, str | None] | None:
    """The run's status and the process that runs it, or None for an unknown run."""
    rows = db.rows("SELECT status, owner FROM runs WHERE id = ?", (run_id,))
    return (str(rows[0]["status"]), rows[0]["owner"]) if rows else None


def send(db: Db, dialect: Dialect, target: str, kind: str, payload: dict[str, Any]) -> str:
    """Ask the process `target` to do something; the command's id."""
    command_id = uuid.uuid4().hex
    db.execute(
        f"INSERT INTO commands (id, target, kind, payload, created) VALUES (?, ?, ?, ?, {NOW[dialect]})",
        (command_id, target, kind, json.dumps(payload)),
    )
    notify(db, dialect, COMMANDS_CHANNEL, [target])
    return command_id


def pending(db: Db, me: str) -> bool:
    """Whether a command waits for this process (a read, before `take` opens a transaction)."""
    return bool(db.rows("SELECT 1 AS found FROM commands WHERE target = ? AND taken IS NULL LIMIT 1", (me,)))


def take(db: Db, me: str) -> list[Command]:
    """The commands waiting for this process, marked taken (a sender that gave up on one has removed it)."""
    rows = db.rows("SELECT id, kind, payload FROM commands WHERE target = ? AND taken IS NULL ORDER BY created", (me,))
    now = time.time()
    commands = []
    for row in rows:
        if not db.execute("UPDATE commands SET taken = ? WHERE id = ? AND taken IS NULL", (now, row["id"])):
            continue
        try:
            payload = json.loads(row["payload"])
        except (TypeError, ValueError):
            payload = None
        if isinstance(payload, dict):
            commands.append(Command(str(row["id"]), str(row["kind"]), payload))
        else:  # answered here, so that it holds up neither its sender nor the commands after it
            answer(db, str(row["id"]), {"status": 400, "detail": "the command's payload could not be read"})
    return commands


def answer(db: Db, command_id: str, result: dict[str, Any]) -> bool:
    """The outcome of a command, for its sender; False if the sender has stopped waiting for it (`give_up`)."""
    return db.execute("UPDATE commands SET result = ? WHERE id = ?", (json.dumps(result), command_id)) > 0


def outcome(db: Db, command_id: str) -> tuple[Literal["waiting", "taken", "gone"], dict[str, Any] | None]:
    """Where the command is (`gone`: swept with its target, which died), and its outcome once answered."""
    rows = db.rows("SELECT taken, result FROM commands WHERE id = ?", (command_id,))
    if not rows:
        return "gone", None
    if rows[0]["result"] is None:
        return ("waiting" if rows[0]["taken"] is None else "taken"), None
    result: dict[str, Any] = json.loads(rows[0]["result"])
    return "taken", result


def withdraw(db: Db, command_id: str) -> bool:
    """Take back a command its target has not taken; False if it has been taken meanwhile."""
    return db.execute("DELETE FROM commands WHERE id = ? AND taken IS NULL", (command_id,)) > 0


STARTING = 102
"""The status a follow-up's command holds while its target starts the run (`claim`): not an answer yet."""


def claim(db: Db, command_id: str) -> bool:
    """Mark a taken command as being carried out, so that its sender no longer gives up on it; False if the
    sender already has (then the target does nothing)."""
    started = json.dumps({"status": STARTING})
    return db.execute("UPDATE commands SET result = ? WHERE id = ? AND result IS NULL", (started, command_id)) > 0


def give_up(db: Db, command_id: str) -> bool:
    """Stop waiting for a command its target took but has not answered: removed, so that the target, answering
    late, learns that no one waits for the answer (`answer`); False if it has been answered meanwhile."""
    return db.execute("DELETE FROM commands WHERE id = ? AND result IS NULL", (command_id,)) > 0


def remove(db: Db, command_id: str) -> None:
    db.execute("DELETE FROM commands WHERE id = ?", (command_id,))


def abandon(db: Db, command_id: str) -> dict[str, Any] | None:
    """Remove a command whatever its state (its sender stopped waiting); its answer if it had one."""
    rows = db.rows("DELETE FROM commands WHERE id = ? RETURNING result", (command_id,))
    result = rows[0]["result"] if rows else None
    return json.loads(result) if result is not None else None


def save_session(db: Db, row: SessionRow) -> None:
    db.execute(
        "INSERT INTO sessions (id, owner, created, last_used, runs, live_run, input_chars, input_lines) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
        "last_used = excluded.last_used, runs = excluded.runs, live_run = excluded.live_run, "
        # kept again by a live process (one taken for dead keeps its sessions under its new id): no tombstone
        "gone = CASE WHEN excluded.owner IN (SELECT id FROM processes) THEN NULL ELSE sessions.gone END",
        (
            row.id,
            row.owner,
            row.created,
            row.last_used,
            json.dumps(row.runs),
            row.live_run,
            row.input_chars,
            row.input_lines,
        ),
    )


def drop_session(db: Db, session_id: str, owner: str) -> None:
    db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))


def idle_sessions(db: Db, dialect: Dialect, me: str, dead_after_s: float) -> list[tuple[str, str, str, int]]:
    """The idle sessions that live processes other than `me` keep, longest idle first: (session id, owner,
    the owner's host and pid)."""
    rows = db.rows(
        "SELECT s.id, s.owner, p.host, p.pid FROM sessions s JOIN processes p ON p.id = s.owner "
        "WHERE s.owner <> ? AND s.gone IS NULL AND s.live_run IS NULL "
        f"AND p.heartbeat >= {NOW[dialect]} - ? ORDER BY s.last_used",
        (me, dead_after_s),
    )
    return [(str(row["id"]), str(row["owner"]), str(row["host"]), int(row["pid"])) for row in rows]


def find_session(db: Db, dialect: Dialect, session_id: str, dead_after_s: float) -> SessionRow | None:
    """A session's row, with whether the process that keeps it is alive (its heartbeat is recent)."""
    rows = db.rows(
        "SELECT s.id, s.owner, s.created, s.last_used, s.runs, s.live_run, s.input_chars, s.input_lines, "
        f"s.gone, p.heartbeat, {NOW[dialect]} AS now FROM sessions s "
        "LEFT JOIN processes p ON p.id = s.owner WHERE s.id = ?",
        (session_id,),
    )
    if not rows:
        return None
    row = rows[0]
    alive = row["heartbeat"] is not None and row["heartbeat"] >= row["now"] - dead_after_s
    return SessionRow(
        id=row["id"],
        owner=row["owner"],
        created=row["created"],
        last_used=row["last_used"],
        runs=json.loads(row["runs"]),
        live_run=row["live_run"],
        input_chars=row["input_chars"],
        input_lines=row["input_lines"],
        gone=row["gone"],
        owner_alive=alive,
    )
