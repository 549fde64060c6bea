"""The run routes: `POST /process` starts a run and streams it; clients re-attach to it and cancel it.

Every stream is Server-Sent Events through sse-starlette: each event is `event: <type>`, `id: <seq>`
and `data: <JSON>`, a `: ping` comment keeps quiet connections open, and a client that takes longer
than RLM_SEND_TIMEOUT_S to accept an event is dropped. What a closed stream means depends on who
opened it: the `/process` connection of a run started without `settings.detach` owns the run, so
closing it cancels the run; every other stream only follows.

When other processes serve the instance too (`app.state.fleet`, fleet.py), a run or a session this process
does not hold may be another's: the routes follow, cancel, end or continue it through the fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from .capacity import Capacity
from .config import Settings
from .engine import SHUTTING_DOWN, Engine, RunSettings, SettingsRefused, effective_limits
from .events import EventBase, lost_event, sse_safe
from .fleet import Fleet, Launch
from .followers import PAGE_CHARS, owed_lost, stored_events
from .history import in_store
from .inputs import RunInput
from .runs import LiveRun
from .sessions import SessionUnavailable
from .store import RunStore, StoreUnavailable, off_loop, shown_id, valid_run_id
from .uploads import FORM_OVERHEAD_BYTES, BodyLimits, ParsedRequest, json_too_large, read_json, read_multipart

log = logging.getLogger("rlm_service.api")
T = TypeVar("T")

PROCESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The run, as Server-Sent Events."},
    400: {"description": "Malformed body"},
    401: {"description": "Bad or missing token"},
    408: {"description": "The body arrived too slowly"},
    413: {"description": "Body, input or prompt too large"},
    415: {"description": "Unsupported content type"},
    422: {"description": "Invalid fields"},
    429: {"description": "Too many runs at once"},
    503: {"description": "No model configured"},
}


class RunSlots:
    """Runs in progress on this instance, and request bodies being read by this process; past the limits, 429."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.limit = capacity.limit
        self.stopping = False
        """Set when the server is asked to stop (`api.stop_runs`): no run starts after that (503)."""
        self._held: dict[asyncio.Future[None], Callable[[], object]] = {}
        self._readers: dict[asyncio.Task[Any], bool] = {}
        """The tasks reading a request body (`reading_body`), and whether `stop` cancelled them."""
        self.reading = 0
        self.reading_limit = max(4 * capacity.limit, 64)
        """Bodies read at once (`/process`, `/v1/chat/completions`, `/mcp`), bounded on their own: slow uploads
        take no run slot. A `/process` body holds at most about 1 MiB of the server's memory (multipart goes to
        disk, large JSON to its parser process); a chat or MCP body is held whole, up to RLM_MAX_JSON_BYTES."""

    @property
    def active(self) -> int:
        return self.capacity.used

    @contextmanager
    def reading_body(self) -> Iterator[None]:
        """Count a request body being read while the block runs; 429 when `reading_limit` are already. When the
        server stops meanwhile (`stop`), the block is cancelled and the request answered 503: a body arriving
        slowly would otherwise hold the stop until uvicorn's grace ran out and cut it (a bare 500)."""
        if self.stopping:
            raise _stopping()
        if self.reading >= self.reading_limit:
            raise HTTPException(
                429, "too many request bodies are arriving at once; retry shortly", headers={"Retry-After": "5"}
            )
        task = asyncio.current_task()
        assert task is not None
        self.reading += 1
        self._readers[task] = False
        try:
            yield
        except asyncio.CancelledError:
            if not self._readers[task]:
                raise
            task.uncancel()  # the cancellation was `stop`'s, and ends here as its answer
            raise _stopping() from None
        finally:
            self.reading -= 1
            del self._readers[task]

    @contextmanager
    def holding(self, cancel: Callable[[], object]) -> Iterator[None]:
        """The block answers a client for a run that another process runs (a follow-up forwarded to the
        process keeping its session): if the server stops meanwhile, `cancel` is called, and the server waits
        for the block to end as it waits for its own runs (`stop`)."""
        done = asyncio.get_running_loop().create_future()
        self._held[done] = cancel
        try:
            yield
        finally:
            del self._held[done]
            done.set_result(None)

    def stop(self) -> list[asyncio.Future[None]]:
        """The server is stopping: no run starts from now on; the held blocks are told (`holding`). What to wait
        for before the streams are ended."""
        self.stopping = True
        for cancel in self._held.values():
            cancel()
        for task in self._readers:
            self._readers[task] = True
            task.cancel()
        return list(self._held)

    def refuse_if_full(self) -> None:
        if self.stopping:
            raise _stopping()
        if self.capacity.used >= self.limit:
            raise self._full()

    def start(self, launch: Callable[[], LiveRun]) -> LiveRun:
        """Take a run's slot (429 when the instance has none left, 503 once the server is stopping) and `launch`
        the run in it; the slot is given back when the run ends, or at once if it could not start."""
        if self.stopping:
            raise _stopping()
        if not self.capacity.try_take():
            raise self._full()
        try:
            run = launch()
        except BaseException:
            self.capacity.give()
            raise
        run.on_end(lambda _: self.capacity.give())
        return run

    def follow_up_launcher(self, engine: Callable[[], Engine]) -> Launch:
        """How this process starts a follow-up another process asked for (`Fleet`): in a run slot, like its own."""

        def launch(prompt: str, run_settings: RunSettings, session_id: str, run_id: str) -> LiveRun:
            return self.start(
                lambda: engine().launch(
                    prompt, RunInput.from_text(""), run_settings, run_id=run_id, session_id=session_id
                )
            )

        return launch

    def _full(self) -> HTTPException:
        return HTTPException(
            429,
            f"{self.limit} runs are already in progress (RLM_MAX_CONCURRENT_RUNS); retry when one has finished",
            headers={"Retry-After": "5"},
        )


def _stopping() -> HTTPException:
    return HTTPException(503, "the server is shutting down; send the request again", headers={"Retry-After": "1"})


SEP = "\n"
STORED_CHECK_WAIT_S = 5.0
"""How long a question about a run of this process waits for its history's writer to catch up before asking the
history whether the run was deleted (then it is assumed not)."""
LAST_EVENT_NUMBER = 2**63 - 1
"""A client's event number (`?after`, `Last-Event-ID`) is taken as at most this, the largest the history's databases
hold: any larger one also says the client has every event."""
SHUTDOWN_GRACE_S = 4.0
"""How long a live stream goes on once the server stops: enough for its run, cancelled, to end with its `error`
event (also through the database, for a follower of another process's run). After the server's own runs have
ended (`api.stop_runs`, at most STOP_RUNS_S) and sse-starlette's 0.5 s look at the server's state, it ends
within the 8 s uvicorn waits for connections to close (`server.run_uvicorn`)."""


def sse_frame(event: EventBase) -> bytes:
    """One event as an SSE frame. Its data, one JSON text, holds no line break, so it is a single `data:` line
    as it is (sse-starlette's encoder would scan all of it for line breaks to split, for every client)."""
    head = f"id: {event.seq}{SEP}event: {event.type}{SEP}data: "
    return head.encode() + sse_safe(event.model_dump_json()).encode() + (SEP + SEP).encode()


async def _sse(
    events: Iterable[EventBase] | AsyncIterator[EventBase], frame: Callable[[EventBase], bytes]
) -> AsyncIterator[bytes]:
    """The events' frames, with a pass through the event loop after each: sending to a client that reads fast
    never waits, so a run's thousands of events replayed at once would otherwise be framed and sent while
    every other request waits. Closed while it waits to send (the client left, sse-starlette closes it), it
    closes `events` at once: left at its `yield`, a run's stream would run its clean-up, cancelling the run its
    client left, only when the garbage collector got to it."""
    if isinstance(events, AsyncIterator):
        try:
            async for event in events:
                yield frame(event)
                await asyncio.sleep(0)
        finally:
            if isinstance(events, AsyncGenerator):
                await events.aclose()
    else:
        for event in events:
            yield frame(event)
            await asyncio.sleep(0)


def event_stream(
    settings: Settings,
    events: Iterable[EventBase] | AsyncIterator[EventBase],
    *,
    ping_s: float,
    headers: dict[str, str] | None = None,
    frame: Callable[[EventBase], bytes] = sse_frame,
    on_shutdown: Callable[[], object] | None = None,
) -> EventSourceResponse:
    """An SSE response of `events`, with keep-alive pings and a send timeout; `frame` makes each event's bytes
    (a live run's `frame` shares a large event's among its followers).

    When the server stops, sse-starlette ends its streams. A live one (`events` an async iterator) first gets
    SHUTDOWN_GRACE_S to end on its own: `on_shutdown` (cancelling its run) is called, so that the run's terminal
    event, `error` `cancelled`, still reaches the client rather than a cut stream."""
    shutdown: anyio.Event | None = None
    if isinstance(events, AsyncIterator):
        shutdown = anyio.Event()
        events = until_shutdown(events, shutdown, on_shutdown)
    return sse_response(settings, _sse(events, frame), ping_s=ping_s, shutdown=shutdown, headers=headers)


def sse_response(
    settings: Settings,
    body: AsyncIterator[Any],
    *,
    ping_s: float,
    shutdown: anyio.Event | None,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """The SSE response of every stream: pings, the send timeout, a grace to end on its own at `shutdown`."""
    return _SseResponse(
        body,
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S if shutdown is not None else 0,
        ping=ping_s,
        sep=SEP,
        send_timeout=settings.rlm_send_timeout_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SEP),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


class _SseResponse(EventSourceResponse):
    """A client that does not accept an event within RLM_SEND_TIMEOUT_S is dropped with a line in the log (and one
    of uvicorn's, as the response ends unfinished): uncaught, sse-starlette's timeout went on to uvicorn, which
    logged 10 KB of traceback for each such client. The kernel ends the connection itself
    (`server.drop_stalled_clients`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:  # (a group when an event's send and a ping's timed out together)
            log.info("a client that accepted no event for %g s was dropped", self.send_timeout or 0)


async def until_shutdown(
    events: AsyncIterator[T], shutdown: anyio.Event, on_shutdown: Callable[[], object] | None
) -> AsyncIterator[T]:
    """`events`, calling `on_shutdown` once `shutdown` is set (the server is stopping: sse-starlette's
    `shutdown_event`, followed by SHUTDOWN_GRACE_S before the stream is ended)."""

    async def watch() -> None:
        await shutdown.wait()
        if on_shutdown is not None:
            on_shutdown()

    watcher = asyncio.ensure_future(watch())
    try:
        async for event in events:
            yield event
    finally:
        watcher.cancel()
        if isinstance(events, AsyncGenerator):
            await events.aclose()  # now, not when the collector gets to it: leaving a stream may cancel its run


def _shared_frames(run: LiveRun) -> Callable[[EventBase], bytes]:
    return lambda event: run.frame(event, sse_frame)


async def _owned(run: LiveRun) -> AsyncIterator[EventBase]:
    """The stream of the connection that started `run`: leaving it cancels the run unless it is detached."""
    try:
        async for event in run.follow():
            yield event
    finally:
        if not run.detached and not run.ended:
            run.cancel("the client disconnected")


def run_router(settings: Settings, slots: RunSlots, *, ping_s: float) -> APIRouter:
    """`POST /process`, `GET /api/runs/{id}/events`, `POST /api/runs/{id}/cancel`."""
    router = APIRouter()
    body_limits = BodyLimits.of(settings)

    @router.post("/process", tags=["runs"], responses=PROCESS_RESPONSES)
    async def process(request: Request) -> Any:
        """Start a run and stream its events. JSON body, or multipart with an `input_file` upload."""
        problem = settings.setup_problem()
        if problem:
            raise HTTPException(503, problem)
        slots.refuse_if_full()  # early, so a client does not upload for nothing
        with slots.reading_body():
            parsed = await _read_request(request, settings, body_limits)
        engine: Engine = request.app.state.engine
        fleet = _fleet(request)
        try:
            if parsed.session_id is not None and parsed.run_input.chars:
                raise HTTPException(
                    422, "a follow-up (session_id) uses its session's input: send no input_data or input_file"
                )
            if fleet is not None and parsed.session_id is not None and engine.sessions.get(parsed.session_id) is None:
                effective_limits(settings, parsed.settings)  # refused here rather than by the session's process
                run_id = await fleet.follow_up(parsed.prompt, parsed.settings, parsed.session_id)
                parsed.run_input.discard()
                detached = parsed.settings.detach
                return event_stream(
                    settings,
                    fleet.owned(run_id, detached=detached),
                    ping_s=ping_s,
                    headers={"X-Run-Id": run_id, "X-Session-Id": parsed.session_id},
                    on_shutdown=None if detached else lambda: fleet.cancel_soon(run_id, SHUTTING_DOWN),
                )
            if parsed.settings.session and parsed.session_id is None:
                # refused first, if it is to be: making room may end another process's idle session
                effective_limits(settings, parsed.settings)
                slots.refuse_if_full()
                await engine.sessions.make_room()
            run = slots.start(
                lambda: engine.launch(parsed.prompt, parsed.run_input, parsed.settings, session_id=parsed.session_id)
            )  # once the body is complete
        except BaseException as exc:
            parsed.run_input.discard()
            if isinstance(exc, SettingsRefused):
                raise HTTPException(422, str(exc)) from None
            if isinstance(exc, SessionUnavailable):
                raise HTTPException(exc.status, str(exc)) from None
            if isinstance(exc, StoreUnavailable):
                raise HTTPException(503, str(exc)) from None
            raise
        run.on_end(lambda _: parsed.run_input.discard())
        # The run's id before its first event, so a client that loses the connection at once can re-attach.
        ids = {"X-Run-Id": run.id} | ({"X-Session-Id": run.session_id} if run.session_id else {})
        return event_stream(
            settings,
            _owned(run),
            ping_s=ping_s,
            headers=ids,
            frame=_shared_frames(run),
            on_shutdown=lambda: run.cancel(SHUTTING_DOWN),
        )

    @router.get(
        "/api/runs/{run_id}/events",
        tags=["runs"],
        responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "Unknown run"}},
    )
    async def run_events(
        request: Request,
        run_id: str,
        after: int | None = Query(None, ge=0, description="Send only events numbered above this."),
        last_event_id: str | None = Header(None),
    ) -> Any:
        """A run's events from the start (or after `Last-Event-ID` / `?after=N`), then live until it ends."""
        # both say which events the client has; an EventSource opened on `?after=N` reconnects to that same URL
        # with the header of the last event it got, and `?after` alone sent it N+1… again
        start = min(max(after or 0, _event_number(last_event_id)), LAST_EVENT_NUMBER)
        engine: Engine = request.app.state.engine
        run = engine.runs.get(run_id) if valid_run_id(run_id) else None
        fleet = _fleet(request)
        if run is not None and run.ended and fleet is not None and not await _still_stored(request, run_id):
            run = None  # kept in memory after its end, it was deleted through another process since: 404
        if run is not None:
            return event_stream(
                settings,
                run.follow(start),
                ping_s=ping_s,
                frame=_shared_frames(run),
                on_shutdown=lambda: run.cancel(SHUTTING_DOWN),
            )
        if fleet is not None and valid_run_id(run_id) and await in_fleet(fleet.live_elsewhere, run_id):
            return event_stream(settings, fleet.follow(run_id, start), ping_s=ping_s)
        store, status = await _stored_status(request, run_id)
        first = await in_store(store.events_page, run_id, start or 0, PAGE_CHARS)  # 503 now rather than mid-stream
        return event_stream(settings, _past_run(store, run_id, status, start or 0, first), ping_s=ping_s)

    @router.post(
        "/api/runs/{run_id}/cancel",
        tags=["runs"],
        status_code=202,
        responses={404: {"description": "Unknown run"}, 409: {"description": "The run already ended"}},
    )
    async def cancel_run(request: Request, run_id: str) -> JSONResponse:
        """End a live run: its stream ends with `error`, code `cancelled`."""
        engine: Engine = request.app.state.engine
        run = engine.runs.get(run_id) if valid_run_id(run_id) else None
        fleet = _fleet(request)
        if run is None and fleet is not None and valid_run_id(run_id):
            sent = await in_fleet(lambda: fleet.cancel(run_id, wait=True))
            if sent == "unknown":
                raise HTTPException(404, f"no run {shown_id(run_id)} on this server")
            if sent == "ended":
                raise HTTPException(409, f"run {run_id} has already ended")
            return JSONResponse({"id": run_id, "status": "cancelling"}, status_code=202)
        if run is None:
            await _stored_status(request, run_id)  # 404 if unknown
            raise HTTPException(409, f"run {run_id} has already ended")
        if not run.cancel("cancelled through the API"):
            if fleet is not None and not await _still_stored(request, run_id):  # deleted through another process
                raise HTTPException(404, f"no run {shown_id(run_id)} on this server")
            raise HTTPException(409, f"run {run_id} has already ended")
        return JSONResponse({"id": run_id, "status": "cancelling"}, status_code=202)

    @router.get("/api/sessions/{session_id}", tags=["sessions"], responses={404: {"description": "Unknown session"}})
    async def get_session(request: Request, session_id: str) -> dict[str, Any]:
        """A session: its runs in order, the live one if any, and when it expires if left idle."""
        engine: Engine = request.app.state.engine
        described = engine.sessions.describe(session_id)
        if described is None and (fleet := _fleet(request)) is not None:
            return await in_fleet(fleet.session, session_id)
        if described is None:
            raise HTTPException(404, f"no session {shown_id(session_id)} (it never existed, was deleted, or expired)")
        return described

    @router.delete(
        "/api/sessions/{session_id}",
        tags=["sessions"],
        status_code=204,
        responses={404: {"description": "Unknown session"}, 409: {"description": "A run of it is live"}},
    )
    async def delete_session(request: Request, session_id: str) -> Response:
        """End a session: its worker is stopped and its workspace (its input included) removed."""
        engine: Engine = request.app.state.engine
        if (live := engine.sessions.live_run(session_id)) is not None:
            raise HTTPException(409, f"run {live} of this session is live; cancel it first")
        session = engine.sessions.get(session_id)
        if session is None and (fleet := _fleet(request)) is not None:
            await in_fleet(fleet.end_session, session_id)
            return Response(status_code=204)
        if session is None:
            raise HTTPException(404, f"no session {shown_id(session_id)} (it never existed, was deleted, or expired)")
        await engine.sessions.end(session_id)
        return Response(status_code=204)

    return router


def _fleet(request: Request) -> Fleet | None:
    """The other processes of the instance, when there are any."""
    fleet: Fleet | None = getattr(request.app.state, "fleet", None)
    return fleet


async def in_fleet(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """A request to the other processes: a session they refuse as its status, 503 while the database is down."""
    try:
        return await call(*args)
    except SessionUnavailable as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except StoreUnavailable as exc:
        raise HTTPException(503, str(exc)) from None


def _event_number(value: str | None) -> int:
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0


async def _stored_status(request: Request, run_id: str) -> tuple[RunStore, str]:
    """The history holding a past run, and the run's status; 404 when there is no such run."""
    store: RunStore | None = request.app.state.store
    status = await in_store(store.status, run_id) if store is not None and valid_run_id(run_id) else None
    if store is None or status is None:
        raise HTTPException(404, f"no run {shown_id(run_id)} on this server")
    return store, status


async def _still_stored(request: Request, run_id: str) -> bool:
    """Whether the history still holds a run of this process (assumed so while the database cannot be reached).
    A run not found is asked about again once what the history's writer holds is written: a writer held up (a
    lock, the writes queued while PostgreSQL restarted) has not written the run's row yet, which is not a
    delete."""
    store: RunStore | None = request.app.state.store
    try:
        if store is None or await off_loop(store.status, run_id) is not None:
            return True
        if not await off_loop(store.flush, STORED_CHECK_WAIT_S):
            return True
        return await off_loop(store.status, run_id) is not None
    except StoreUnavailable:
        return True


async def _past_run(
    store: RunStore, run_id: str, status: str, after: int, first: tuple[list[dict[str, Any]], bool]
) -> AsyncIterator[EventBase]:
    """A past run's events after `after` from history, a page at a time (`first` is read), and for a run its server
    left unfinished an `error` `lost` to end it. A database lost midway ends the stream: the client re-attaches."""
    last = after
    try:
        async for event in stored_events(store, run_id, after, first):
            last = event.seq
            yield event
    except StoreUnavailable as exc:
        log.warning("run %s: its stream from the history ended early: %s", run_id, exc)
        return
    if status == "unfinished":  # its server stopped before the run ended
        yield lost_event(run_id, last, "the server stopped before this run ended; it is unfinished")
    elif status == "lost" and last == after:  # asked after its stored `lost`
        yield await owed_lost(store, run_id, last, "the server process that ran it stopped without ending it")


async def _read_request(request: Request, settings: Settings, limits: BodyLimits) -> ParsedRequest:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    if media_type == "application/json":
        if declared and declared.isdigit() and (refusal := json_too_large(limits, int(declared))) is not None:
            raise refusal
        return await read_json(request.stream(), limits)
    if media_type == "multipart/form-data":
        if declared and declared.isdigit() and int(declared) > limits.input_bytes + FORM_OVERHEAD_BYTES:
            raise HTTPException(
                413,
                f"the body ({int(declared):,} bytes) is larger than RLM_MAX_INPUT_BYTES ({limits.input_bytes:,} bytes)",
            )
        return await read_multipart(request.stream(), content_type, limits)
    shown = media_type or "none"
    raise HTTPException(415, f"unsupported Content-Type ({shown}): send application/json or multipart/form-data")
