"""The command line's client of a running service (`rlm-service run --server URL`).

It posts the run to `URL/process` and reads the event stream with httpx2's `EventSource`, which splits
lines only where Server-Sent Events do (CR, LF, CRLF: text such as U+2028 stays inside its line), joins
`data:` lines, keeps `id:` and skips comments. Whatever goes wrong is said in words a user can act on:
a URL that is not the service, a missing or wrong token, a refusal and its reason, a stream cut short.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from .terminal import printable

MAX_EVENT_BYTES = 256 * 1024**2
"""Largest event read from a server: a final answer is one event, and answers may be large."""


class Refused(Exception):
    """The run could not start; the message says why."""


class RunLost(Exception):
    """The run started but its stream ended before a `final` or `error` event; the message says where."""


@dataclass(frozen=True)
class StreamedEvent:
    """One event of a run as the server sent it: its name, its JSON data and its SSE id."""

    name: str
    data: dict[str, Any]
    id: str


def base_url(url: str) -> str:
    """The service's base URL, checked; refused with a reason when it cannot be one."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"--server {url!r} is not an http(s) URL; give the service's address, "
                      "e.g. http://127.0.0.1:8000")
    return url.strip().rstrip("/")


async def server_events(url: str, token: str | None, prompt: str, text: str | None, file: Path | None,
                        settings: dict[str, Any]) -> AsyncIterator[StreamedEvent]:
    """The events of one run on the service at `url`: the input as text (JSON body) or as a file (upload)."""
    base = base_url(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10)) as client:
        if file is not None:
            with open(file, "rb") as handle:  # noqa: ASYNC230 - the client streams it as it reads
                files = {"prompt": (None, prompt), "settings": (None, json.dumps(settings)),
                         "input_file": (file.name, handle, "text/plain")}
                async for event in _stream(client, base, token, headers, files=files):
                    yield event
        else:
            body = {"prompt": prompt, "input_data": text or "", "settings": settings}
            async for event in _stream(client, base, token, headers, json=body):
                yield event


async def _stream(client: httpx2.AsyncClient, base: str, token: str | None, headers: dict[str, str],
                  **request: Any) -> AsyncIterator[StreamedEvent]:
    answered, last = False, None
    try:
        async with client.stream("POST", f"{base}/process", headers=headers, **request) as response:
            if response.status_code != 200:
                await response.aread()
                raise Refused(refusal(base, response, token))
            media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "text/event-stream":
                raise Refused(f"{base}/process answered with {media_type or 'no content type'}, not an event "
                              f"stream: {_not_the_service(base)}")
            answered = True
            async for sse in httpx2.EventSource(response, max_event_size=MAX_EVENT_BYTES):
                if not sse.data:
                    continue
                last = StreamedEvent(sse.event, _json_object(sse.data, base), sse.id)
                yield last
                if last.name in ("final", "error"):
                    return
    except httpx2.SSEError as exc:
        raise RunLost(f"{printable(str(exc))} {_where(base, last)}") from None
    except httpx2.TransportError as exc:
        reason = printable(str(exc)) or type(exc).__name__
        if isinstance(exc, httpx2.ConnectError):
            raise Refused(f"could not connect to {base} ({reason}): is the service running there?") from None
        if not answered:
            raise Refused(f"no answer from {base}: {reason}") from None
        raise RunLost(f"the connection to {base} broke ({reason}) {_where(base, last)}") from None
    raise RunLost(f"the stream from {base} ended before the run finished {_where(base, last)}")


def _json_object(data: str, base: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise RunLost(f"{base} sent an event whose data is not a JSON object: {printable(data[:200])!r}")
    return value


def _where(base: str, last: StreamedEvent | None) -> str:
    """Which event came last, so the user can find the run (its events stay in the history)."""
    if last is None:
        return "(no event came)"
    run = printable(str(last.data.get("run_id", "?")))
    return f"(after event {printable(last.id or last.name)} of run {run}; {base}/api/runs/{run} shows it)"


def _not_the_service(base: str) -> str:
    path = urlsplit(base).path
    hint = f" without the path {path!r}" if path else ""
    return f"is {base} the RLM service? Give its base address{hint}, e.g. http://127.0.0.1:8000."


def refusal(base: str, response: httpx2.Response, token: str | None) -> str:
    """What a refusal of the run means, in words, with what to do about it."""
    status = f"{response.status_code} {response.reason_phrase}".strip()
    body = _json_body(response)
    detail = _detail(body, response)
    if response.status_code == 401:
        if token:
            return (f"the server at {base} did not accept the token ({status}): check --token against the "
                    "server's RLM_API_TOKEN")
        return f"the server at {base} needs a token ({status}): pass --token with the server's RLM_API_TOKEN"
    if response.status_code in (404, 405) and (body is None or body.get("detail") in (None, "Not Found",
                                                                                        "Method Not Allowed")):
        # the service refuses a run with a reason of its own; a bare 404 or 405 is some other server or path
        if body is not None and isinstance(body.get("error"), dict):
            return (f"{base}/process answered {status} with an OpenAI-style error: that looks like a model "
                    "server, which belongs in OPENAI_API_BASE; --server wants the RLM service's address")
        return f"{base}/process answered {status}: {_not_the_service(base)}"
    return f"the server refused the run ({status}): {detail or 'no reason given'}"


def _json_body(response: httpx2.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _detail(body: dict[str, Any] | None, response: httpx2.Response) -> str | None:
    """The reason in a refusal's body: FastAPI's `detail`, an OpenAI-style `error.message`, or short text."""
    if body is not None:
        detail, error = body.get("detail"), body.get("error")
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
        elif detail is None and isinstance(error, dict):
            detail = error.get("message")
        return printable(str(detail))[:500] if detail else None
    if response.headers.get("content-type", "").startswith("text/plain") and response.text.strip():
        return printable(response.text.strip())[:300]
    return None
