"""The command line's client of a running service (`rlm-service run|attach|cancel|session --server URL`).

Runs it starts are detached (`settings.detach`): a dropped connection does not cancel them, so when one
drops the client re-attaches by itself (`GET /api/runs/{id}/events` with `Last-Event-ID`, the number of
the last event it received) and goes on, for up to `reconnect_s` seconds without progress. Each event
reaches the caller exactly once and in order: the server sends only later events, and the client drops
any it already had. A stream that ends with nothing new is a drop only while the run goes on: for a run
that has ended (its events asked for past its last one) it is `RunOver`. Ending a run is explicit
(`cancel`). Whatever goes wrong is said in words a user can act on: a URL that is not the service, a
missing or wrong token, a refusal and its reason, a session that is gone or busy, a stream cut short and
where.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from .ssereader import EventTooLarge, SseDecoder, StreamedEvent
from .terminal import printable

MAX_REFUSAL_BYTES = 64 * 1024
"""What is read of a refusal's body to find its reason."""
STALL_S = 60.0
"""Silence after which a connection counts as dropped: the service sends a keep-alive comment every 10 s."""
RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""Answers to a re-attach that a later attempt may not get (a proxy or the server restarting)."""
RETRY_DELAYS_S = (0.0, 0.5, 1.0, 2.0, 4.0)
"""Waits before the re-attach attempts of one outage; the last one repeats."""
MAX_RUN_BYTES = 64 * 1024**2
"""What is read of a run as the history has it (`GET /api/runs/{id}`, every event included) to learn how it ended;
a larger one is taken as a run the service cannot say about."""
ANSWER_S = 60.0
"""How long reading an answer (a session, a refusal's reason, a run as the history has it) may take, however its
bytes trickle in."""
ENDED_CHECK_S = 10.0
"""How long reading a run's terminal event (to learn how the run ended) may take."""


class Refused(Exception):
    """The request could not be done (a run not started, a session not found); the message says why."""


class RunLost(Exception):
    """The run started but its events could not all be read; the message says where they stopped."""


class RunOver(Exception):
    """The run has ended and has no events after the last one asked for: none will come. `run` is the run as the
    history has it (its `status`, `error`, `ready`…), `last` the number of its last event (0 for none)."""

    def __init__(self, run: dict[str, Any], last: int) -> None:
        super().__init__(f"the run has ended ({run.get('status')})")
        self.run = run
        self.last = last


class _Unavailable(Exception):
    """A re-attach answered with a status a later attempt may not get."""


def base_url(url: str) -> str:
    """The service's base URL, checked; refused with a reason when it cannot be one."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"--server {url!r} is not an http(s) URL; give the service's address, e.g. http://127.0.0.1:8000")
    return url.strip().rstrip("/")


Opener = Callable[[], AbstractAsyncContextManager[aiohttp.ClientResponse]]


class ServiceClient:
    """One service's runs and sessions. Use as `async with ServiceClient(url, token) as client:`."""

    def __init__(
        self, url: str, token: str | None, *, reconnect_s: float = 120.0, notify: Callable[[str], None] = lambda _: None
    ) -> None:
        self.base = base_url(url)
        self.token = token
        self.reconnect_s = reconnect_s
        self.notify = notify
        """Told, in words, when a connection drops and when the client has re-attached."""
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServiceClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STALL_S)
        self._http = aiohttp.ClientSession(timeout=timeout, trust_env=True, headers=headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("use ServiceClient in `async with`")
        return self._http

    def url(self, *parts: str) -> str:
        return self.base + "/" + "/".join(quote(part, safe="") for part in parts)

    def start(
        self,
        prompt: str,
        text: str | None,
        file: Path | None,
        settings: dict[str, Any],
        *,
        session_id: str | None = None,
    ) -> RunStream:
        """A new run, detached, with the input as text (a JSON body) or as a file (an upload, streamed from
        disk); with `session_id` a follow-up question on that session (no input)."""
        settings = {**settings, "detach": True}

        @asynccontextmanager
        async def post() -> AsyncIterator[aiohttp.ClientResponse]:
            if file is not None:
                # opened by its path as bytes: aiohttp takes a file's name (as text) for a header of its own,
                # and a name that is not UTF-8 cannot be one (`_shown_name` is the name the form gives)
                with open(os.fsencode(file), "rb") as handle:  # noqa: ASYNC230 - aiohttp streams it as it reads
                    # the file's name as it is, as browsers send it: aiohttp's default percent-encodes it, and the
                    # service, as any form parser, keeps that (`my notes.txt` was listed as `my%20notes.txt`)
                    form = aiohttp.FormData(quote_fields=False)
                    form.add_field("prompt", prompt)
                    form.add_field("settings", json.dumps(settings))
                    form.add_field("input_file", handle, filename=_shown_name(file), content_type="text/plain")
                    async with self.http.post(f"{self.base}/process", data=form) as response:
                        yield response
            else:
                body: dict[str, Any] = {"prompt": prompt, "settings": settings}
                body.update({"session_id": session_id} if session_id else {"input_data": text or ""})
                async with self.http.post(f"{self.base}/process", json=body) as response:
                    yield response

        return RunStream(self, post, session_id=session_id)

    def attach(self, run_id: str, after: int = 0) -> RunStream:
        """The events of a run already started, those numbered above `after`, then live until it ends."""
        return RunStream(self, lambda: self.events_request(run_id, str(after)), run_id=run_id, after=after)

    def events_request(self, run_id: str, last_id: str) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """`GET /api/runs/{id}/events`: the run's events numbered above `last_id`, then live."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        return self.http.get(self.url("api", "runs", run_id, "events"), headers=headers)

    async def ended(self, run_id: str, after: str) -> RunOver | None:
        """How a run that has nothing after event `after` ended: from that event, when it is the run's terminal
        one (one event read, the history on or off), else from the history (`GET /api/runs/{id}`, the whole run).
        None while it runs, and when the service cannot say (its history off, the run not written there yet,
        no answer, an answer not of the service)."""
        number = _number(after)
        if number is not None and number > 0 and (over := await self._ended_with(run_id, number)) is not None:
            return over
        try:
            async with self.http.get(self.url("api", "runs", run_id)) as response:
                raw = await _read_whole(response, MAX_RUN_BYTES) if response.status == 200 else None
                body = _json_body(raw) if raw is not None else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        run, events = (body or {}).get("run"), (body or {}).get("events")
        if not isinstance(run, dict) or run.get("status") in (None, "running") or not isinstance(events, list):
            return None
        numbers = [event.get("seq") for event in events if isinstance(event, dict)]
        return RunOver(run, max((number for number in numbers if isinstance(number, int)), default=0))

    async def _ended_with(self, run_id: str, number: int) -> RunOver | None:
        """The run's end if its event `number` is its terminal event: the events after the one before it."""
        try:
            async with asyncio.timeout(ENDED_CHECK_S), self.events_request(run_id, str(number - 1)) as response:
                if response.status != 200 or response.content_type != "text/event-stream":
                    return None
                decoder = SseDecoder()
                async for piece in response.content.iter_any():
                    for event in decoder.feed(piece):
                        return _terminal_over(event, number)
        except (aiohttp.ClientError, OSError, TimeoutError, EventTooLarge):
            return None
        return None

    async def cancel(self, run_id: str) -> bool:
        """Ask the service to end a run (it ends with `error` `cancelled`); False if it had already ended."""
        url = self.url("api", "runs", run_id, "cancel")
        async with self._request("post", url) as (status, body):
            if status == 202:
                return True
            if status == 409:
                return False
            if status == 404 and _service_detail(body):
                raise Refused(f"{self.base} has no run {printable(run_id)}")
            raise Refused(self.refusal(status, body, what="cancel", url=url))

    async def session(self, session_id: str) -> dict[str, Any]:
        """A session: its runs, its live run if any, when it expires if left idle."""
        url = self.url("api", "sessions", session_id)
        async with self._request("get", url) as (status, body):
            if status == 200 and body is not None:
                return body
            if status == 404 and _service_detail(body):
                raise Refused(self.session_gone(session_id))
            raise Refused(self.refusal(status, body, what="session", url=url))

    async def end_session(self, session_id: str) -> None:
        """End a session: the service stops its REPL and removes its workspace (its input too)."""
        url = self.url("api", "sessions", session_id)
        async with self._request("delete", url) as (status, body):
            if status == 204:
                return
            if status == 404 and _service_detail(body):
                raise Refused(self.session_gone(session_id))
            if status == 409:
                raise Refused(await self.session_busy(session_id, "it cannot end while a run of it is going"))
            raise Refused(self.refusal(status, body, what="session", url=url))

    @asynccontextmanager
    async def _request(self, method: str, url: str) -> AsyncIterator[tuple[int, dict[str, Any] | None]]:
        """A short request's status and JSON body; a connection failure is a `Refused` that says so."""
        try:
            async with self.http.request(method, url) as response:
                body = _json_body(await _read_up_to(response, MAX_REFUSAL_BYTES))
                yield response.status, body
        except aiohttp.ClientConnectorError as exc:
            raise Refused(self.unreachable(exc)) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Refused(f"no answer from {self.base}: {_reason(exc)}") from None

    def unreachable(self, exc: aiohttp.ClientConnectorError) -> str:
        return f"could not connect to {self.base} ({printable(str(exc.os_error))}): is the service running there?"

    def session_gone(self, session_id: str) -> str:
        return (
            f"session {printable(session_id)} is not on {self.base}: it never existed there, was ended, or "
            "expired after being left idle (the server's RLM_SESSION_IDLE_S); start a new run with the input "
            "and --session"
        )

    async def session_busy(self, session_id: str, consequence: str) -> str:
        """Why a session is busy, naming its live run when the service says which."""
        try:
            live = (await self.session(session_id)).get("live_run")
        except Refused:
            live = None
        if not isinstance(live, str):
            return f"a run of session {printable(session_id)} is still going: {consequence}"
        run = printable(live)
        return (
            f"run {run} of session {printable(session_id)} is still going: {consequence}; follow it with "
            f"`rlm-service attach {run} --server {self.base}` or stop it with "
            f"`rlm-service cancel {run} --server {self.base}`"
        )

    def refusal(
        self,
        status: int,
        body: dict[str, Any] | None,
        *,
        what: str = "run",
        reason: str = "",
        content_type: str = "application/json",
        raw: bytes = b"",
        url: str = "",
    ) -> str:
        """What a refusal means, in words, with what to do about it."""
        shown = printable(f"{status} {reason}".strip())
        if status == 401:
            if self.token:
                return (
                    f"the server at {self.base} did not accept the token ({shown}): check --token against the "
                    "server's RLM_API_TOKEN"
                )
            return f"the server at {self.base} needs a token ({shown}): pass --token with the server's RLM_API_TOKEN"
        if status in (404, 405) and not _service_detail(body):
            # the service refuses with a reason of its own; a bare 404 or 405 is some other server or path
            where = url or f"{self.base}/process"
            if body is not None and isinstance(body.get("error"), dict):
                path = urlsplit(self.base).path
                if path:  # a model server's base, or the service's own OpenAI-compatible endpoint (`/v1`)
                    return (
                        f"{where} answered {shown} with an OpenAI-style error: --server wants the RLM service's "
                        f"base address, without the path {path!r} (e.g. http://127.0.0.1:8000); a model server "
                        "belongs in OPENAI_API_BASE"
                    )
                return (
                    f"{where} answered {shown} with an OpenAI-style error: that looks like a model "
                    "server, which belongs in OPENAI_API_BASE; --server wants the RLM service's address"
                )
            return f"{where} answered {shown}: {_not_the_service(self.base)}"
        detail = _detail(body, content_type, raw)
        return f"the server refused the {what} ({shown}): {detail or 'no reason given'}"


class RunStream:
    """One run's events as (name, data), each exactly once and in order, up to the terminal one; re-attaches
    by itself when the connection drops. `run_id` is known from the first event on."""

    def __init__(
        self,
        client: ServiceClient,
        opener: Opener,
        *,
        run_id: str | None = None,
        after: int = 0,
        session_id: str | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.last_id = str(after) if after else ""
        """The SSE id of the last event received: where a re-attach goes on from."""
        self.answered = False
        """The service took the request: from here on, a run exists."""
        self.ended = False
        self._opener = opener
        self._session_id = session_id
        self._last_name: str | None = None

    def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._events()

    async def _events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        base, opener = self.client.base, self._opener
        outage: float | None = None  # when the current outage began
        attempts = 0
        while True:
            progressed = False
            try:
                async with opener() as response:
                    await self._accept(response)
                    if outage is not None:
                        self.client.notify(f"re-attached to run {self._run()} after event {self.last_id}")
                    self.answered, outage, attempts = True, None, 0
                    async for name, data in self._read(response):
                        progressed = True
                        yield name, data
                        if name in ("final", "error"):
                            self.ended = True
                            return
                problem, clean = f"the stream from {base} ended before the run finished", True
            except aiohttp.ClientConnectorError as exc:
                if not self.answered:
                    raise Refused(self.client.unreachable(exc)) from None
                problem, clean = f"could not connect to {base} ({printable(str(exc.os_error))})", False
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if not self.answered:
                    raise Refused(f"no answer from {base}: {_reason(exc)}") from None
                problem, clean = f"the connection to {base} broke ({_reason(exc)})", False
            except _Unavailable as exc:
                problem, clean = f"{base} could not take the re-attach ({exc})", False
            except EventTooLarge as exc:
                raise RunLost(f"{exc} {self._where()}") from None
            if self.run_id is None:
                raise RunLost(
                    f"{problem} before the run's first event: a detached run may go on there "
                    f"({base}/api/runs lists the runs)"
                )
            if clean and not progressed and (over := await self.client.ended(self.run_id, self.last_id)) is not None:
                # nothing after the last event asked for, and the run has ended: a re-attach would get nothing either
                self.ended = True
                raise over
            if not self.last_id:
                raise RunLost(
                    f"{problem} {self._where()}: the server numbers no events, so the client cannot re-attach"
                )
            if clean and opener is not self._opener and not progressed:
                raise RunLost(f"{problem} {self._where()}: the server has no more of it, so it will not finish")
            now = time.monotonic()
            if outage is None:
                outage = now
                self.client.notify(f"{problem} {self._where()}; re-attaching")
            if now - outage >= self.client.reconnect_s:
                raise RunLost(
                    f"{problem} {self._where()}; gave up re-attaching after {self.client.reconnect_s:g} s: "
                    f"`rlm-service attach {self._run()} --server {base} --after {self.last_id}` goes on "
                    "from there"
                )
            await asyncio.sleep(RETRY_DELAYS_S[min(attempts, len(RETRY_DELAYS_S) - 1)])
            attempts += 1
            opener = self._reattach

    def _reattach(self) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.client.events_request(self.run_id or "", self.last_id)

    async def _accept(self, response: aiohttp.ClientResponse) -> None:
        """Go on with a 200 event stream; anything else is refused (a first request) or lost (a re-attach)."""
        if response.status == 200 and response.content_type == "text/event-stream":
            return
        client, url = self.client, _address(str(response.url))
        if response.status == 200:
            raise Refused(
                f"{url} answered with {printable(response.content_type)}, not an event "
                f"stream: {_not_the_service(client.base)}"
            )
        raw = await _read_up_to(response, MAX_REFUSAL_BYTES)
        body = _json_body(raw)
        if self.answered:  # a re-attach
            if response.status in RETRY_STATUSES:
                raise _Unavailable(printable(f"{response.status} {response.reason or ''}".strip()))
            if response.status == 404 and _service_detail(body):
                raise RunLost(
                    f"{client.base} no longer knows run {self._run()} {self._where()}: it was deleted, "
                    "or the server restarted without a history"
                )
            refused = client.refusal(
                response.status,
                body,
                what="re-attach",
                reason=response.reason or "",
                content_type=response.content_type,
                raw=raw,
                url=url,
            )
            raise RunLost(
                f"the stream from {client.base} ended before the run finished {self._where()}; "
                f"re-attaching failed: {refused}"
            )
        if self._session_id and _service_detail(body):
            if response.status == 404:
                raise Refused(client.session_gone(self._session_id))
            if response.status == 409:
                raise Refused(await client.session_busy(self._session_id, "a session answers one question at a time"))
        if self.run_id and response.status == 404 and _service_detail(body):
            raise Refused(
                f"{client.base} has no run {self._run()}: an unknown id, or a run deleted from its "
                f"history ({client.base}/api/runs lists them)"
            )
        raise Refused(
            client.refusal(
                response.status,
                body,
                reason=response.reason or "",
                content_type=response.content_type,
                raw=raw,
                url=url,
            )
        )

    async def _read(self, response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        decoder = SseDecoder()
        async for piece in response.content.iter_any():
            for event in decoder.feed(piece):
                if self._seen(event):
                    continue
                data = _json_object(event.data, self.client.base)
                self.last_id, self._last_name = event.id, event.name
                if self.run_id is None and isinstance(data.get("run_id"), str):
                    self.run_id = data["run_id"]
                yield event.name, data

    def _seen(self, event: StreamedEvent) -> bool:
        """Whether the event is one already received (a server that re-sends what a re-attach skips)."""
        number, last = _number(event.id), _number(self.last_id)
        return number is not None and last is not None and number <= last

    def _run(self) -> str:
        return printable(self.run_id or "?")

    def _where(self) -> str:
        """Which event came last, so the user can find the run (its events stay in the history)."""
        if not self.last_id and self._last_name is None:
            return f"(no event of run {self._run()} came)" if self.run_id else "(no event came)"
        run = self._run()
        return (
            f"(after event {printable(self.last_id or self._last_name or '?')} of run {run}; "
            f"{self.client.base}/api/runs/{run} shows it)"
        )


def _shown_name(file: Path) -> str:
    """The file's name as a form can carry it. A name that is not UTF-8 (`bad\\xff.txt`) comes from the command
    line with its bytes as lone surrogates, which cannot be encoded in the form: the upload failed with a
    traceback. Its undecodable bytes are replaced, as the service does with the file's content; a line break
    (which would end the part's header) is sent as browsers send it, `%0A`."""
    name = os.fsencode(file.name).decode("utf-8", "replace")
    return name.replace("\r", "%0D").replace("\n", "%0A")


def _address(url: str) -> str:
    """Where a request went, without its query, for a message to name."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _number(event_id: str) -> int | None:
    if not (event_id.isascii() and event_id.isdigit()):
        return None
    try:
        return int(event_id)
    except ValueError:  # more digits than Python converts (4300): no event number of the service's
        return None


def _reason(exc: BaseException) -> str:
    return printable(str(exc)) or type(exc).__name__


def _json_object(data: str, base: str) -> dict[str, Any]:
    value = _json_body(data)
    if value is None:
        raise RunLost(f"{base} sent an event whose data is not a JSON object: {printable(data[:200])!r}")
    return value


def _not_the_service(base: str) -> str:
    path = urlsplit(base).path
    hint = f" without the path {path!r}" if path else ""
    return f"is {base} the RLM service? Give its base address{hint}, e.g. http://127.0.0.1:8000."


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body's first `limit` bytes, all of it if shorter, however many reads it takes: one `read(n)` returns
    what has arrived so far, which for a body the network delivers in pieces is the start of its JSON."""
    body = bytearray()
    async with asyncio.timeout(ANSWER_S):  # a server trickling bytes would otherwise hold the command forever
        while len(body) < limit and (piece := await response.content.read(limit - len(body))):
            body += piece
    return bytes(body)


async def _read_whole(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, however many reads it takes (`read(n)` returns what has arrived so far); None past
    `limit` bytes."""
    body = bytearray()
    async with asyncio.timeout(ANSWER_S):  # a server trickling bytes would otherwise hold the command forever
        async for piece in response.content.iter_any():
            body += piece
            if len(body) > limit:
                return None
    return bytes(body)


def _terminal_over(event: StreamedEvent, number: int) -> RunOver | None:
    """The run's end when `event` is its terminal event numbered `number`, with the status the history gives
    such a run (`finished`, `cancelled`, `failed`)."""
    data = _json_body(event.data) if event.id == str(number) else None
    if data is None or event.name not in ("final", "error"):
        return None
    if event.name == "final":
        return RunOver({"status": "finished", "ready": data.get("ready")}, number)
    code = data.get("code")
    error = {"code": code, "message": data.get("message")}
    return RunOver({"status": "cancelled" if code == "cancelled" else "failed", "error": error}, number)


def _json_body(body: bytes | str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # nested deeper than Python's parser goes: no JSON object either
        return None
    return parsed if isinstance(parsed, dict) else None


def _service_detail(body: dict[str, Any] | None) -> bool:
    """Whether a refusal carries a reason of the service's own (not a bare "Not Found" of some server)."""
    return body is not None and body.get("detail") not in (None, "Not Found", "Method Not Allowed")


def _detail(parsed: dict[str, Any] | None, content_type: str, body: bytes) -> str | None:
    """The reason in a refusal's body: FastAPI's `detail`, an OpenAI-style `error.message`, or short text."""
    if parsed is not None:
        detail, error = parsed.get("detail"), parsed.get("error")
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
        elif detail is None and isinstance(error, dict):
            detail = error.get("message")
        return printable(str(detail))[:500] if detail else None
    text = body.decode("utf-8", "replace").strip()
    return printable(text)[:300] if content_type == "text/plain" and text else None
