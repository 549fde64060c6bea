"""The command line's client of a running service (`rlm-service run --server URL`).

It posts the run to `URL/process` with aiohttp and decodes the event stream as the Server-Sent Events
format specifies: lines end at CR, LF or CRLF and nowhere else (text such as U+2028 stays inside its
line, as it would not with `str.splitlines`), `data:` lines join with newlines, `id:` is kept, comments
are skipped. Whatever goes wrong is said in words a user can act on: a URL that is not the service, a
missing or wrong token, a refusal and its reason, a stream cut short.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .terminal import printable

MAX_EVENT_BYTES = 256 * 1024**2
"""Largest event read from a server: a final answer is one event, and answers may be large."""
MAX_REFUSAL_BYTES = 64 * 1024
"""What is read of a refusal's body to find its reason."""

_LINE_END = re.compile(rb"\r\n|\r|\n")


class Refused(Exception):
    """The run could not start; the message says why."""


class RunLost(Exception):
    """The run started but its stream ended before a `final` or `error` event; the message says where."""


@dataclass(frozen=True)
class StreamedEvent:
    """One event of a run as the server sent it: its name, its data (text) and the last event id."""

    name: str
    data: str
    id: str


@dataclass
class SseDecoder:
    """Server-Sent Events from the bytes of a stream, in pieces as they arrive. Lines are split as bytes,
    so only CR and LF end them; each line is then read as UTF-8."""

    max_event_bytes: int = MAX_EVENT_BYTES
    _buffer: bytearray = field(default_factory=bytearray)
    _skip_lf: bool = False  # the last piece ended in CR: an LF starting the next one belongs to it
    _name: str = ""
    _data: list[str] = field(default_factory=list)
    _size: int = 0
    _last_id: str = ""

    def feed(self, piece: bytes) -> list[StreamedEvent]:
        """The events that `piece` completes."""
        if self._skip_lf and piece[:1] == b"\n":
            piece = piece[1:]
        self._skip_lf = False
        scanned = len(self._buffer)  # what is buffered holds no line end
        self._buffer += piece
        events, start = [], 0
        for end in _LINE_END.finditer(self._buffer, scanned):
            event = self._line(self._buffer[start:end.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end.end()
            self._skip_lf = end.group() == b"\r" and start == len(self._buffer)
        del self._buffer[:start]
        if self._size + len(self._buffer) > self.max_event_bytes:
            raise RunLost(f"the server sent an event larger than {self.max_event_bytes:,} bytes")
        return events

    def _line(self, line: str) -> StreamedEvent | None:
        if not line:
            event = StreamedEvent(self._name or "message", "\n".join(self._data), self._last_id) if self._data else None
            self._name, self._data, self._size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
            self._size += len(value)
        elif name == "event":
            self._name = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None


def base_url(url: str) -> str:
    """The service's base URL, checked; refused with a reason when it cannot be one."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"--server {url!r} is not an http(s) URL; give the service's address, "
                      "e.g. http://127.0.0.1:8000")
    return url.strip().rstrip("/")


async def server_events(url: str, token: str | None, prompt: str, text: str | None, file: Path | None,
                        settings: dict[str, Any]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The events of one run on the service at `url`, as (name, data): the input as text (a JSON body)
    or as a file (an upload, streamed from disk)."""
    base = base_url(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:
        if file is not None:
            with open(file, "rb") as handle:  # noqa: ASYNC230 - aiohttp streams it as it reads
                form = aiohttp.FormData()
                form.add_field("prompt", prompt)
                form.add_field("settings", json.dumps(settings))
                form.add_field("input_file", handle, filename=file.name, content_type="text/plain")
                async for event in _stream(session, base, token, headers=headers, data=form):
                    yield event
        else:
            body = {"prompt": prompt, "input_data": text or "", "settings": settings}
            async for event in _stream(session, base, token, headers=headers, json=body):
                yield event


async def _stream(session: aiohttp.ClientSession, base: str, token: str | None,
                  **request: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    answered, last, run_id = False, None, "?"
    try:
        async with session.post(f"{base}/process", **request) as response:
            if response.status != 200:
                raise Refused(refusal(base, response.status, response.reason or "", response.content_type,
                                      await response.content.read(MAX_REFUSAL_BYTES), token))
            if response.content_type != "text/event-stream":
                raise Refused(f"{base}/process answered with {response.content_type}, not an event stream: "
                              f"{_not_the_service(base)}")
            answered, decoder = True, SseDecoder()
            async for piece in response.content.iter_any():
                for last in decoder.feed(piece):
                    data = _json_object(last.data, base)
                    run_id = str(data.get("run_id", run_id))
                    yield last.name, data
                    if last.name in ("final", "error"):
                        return
    except aiohttp.ClientConnectorError as exc:
        raise Refused(f"could not connect to {base} ({printable(str(exc.os_error))}): is the service running "
                      "there?") from None
    except (aiohttp.ClientError, OSError) as exc:
        reason = printable(str(exc)) or type(exc).__name__
        if not answered:
            raise Refused(f"no answer from {base}: {reason}") from None
        raise RunLost(f"the connection to {base} broke ({reason}) {_where(base, last, run_id)}") from None
    raise RunLost(f"the stream from {base} ended before the run finished {_where(base, last, run_id)}")


def _json_object(data: str, base: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise RunLost(f"{base} sent an event whose data is not a JSON object: {printable(data[:200])!r}")
    return value


def _where(base: str, last: StreamedEvent | None, run_id: str) -> str:
    """Which event came last, so the user can find the run (its events stay in the history)."""
    if last is None:
        return "(no event came)"
    run = printable(run_id)
    return f"(after event {printable(last.id or last.name)} of run {run}; {base}/api/runs/{run} shows it)"


def _not_the_service(base: str) -> str:
    path = urlsplit(base).path
    hint = f" without the path {path!r}" if path else ""
    return f"is {base} the RLM service? Give its base address{hint}, e.g. http://127.0.0.1:8000."


def refusal(base: str, status: int, reason: str, content_type: str, body: bytes, token: str | None) -> str:
    """What a refusal of the run means, in words, with what to do about it."""
    shown = printable(f"{status} {reason}".strip())
    parsed = _json_body(body)
    detail = _detail(parsed, content_type, body)
    if status == 401:
        if token:
            return (f"the server at {base} did not accept the token ({shown}): check --token against the "
                    "server's RLM_API_TOKEN")
        return f"the server at {base} needs a token ({shown}): pass --token with the server's RLM_API_TOKEN"
    if status in (404, 405) and (parsed is None or parsed.get("detail") in (None, "Not Found", "Method Not Allowed")):
        # the service refuses a run with a reason of its own; a bare 404 or 405 is some other server or path
        if parsed is not None and isinstance(parsed.get("error"), dict):
            return (f"{base}/process answered {shown} with an OpenAI-style error: that looks like a model "
                    "server, which belongs in OPENAI_API_BASE; --server wants the RLM service's address")
        return f"{base}/process answered {shown}: {_not_the_service(base)}"
    return f"the server refused the run ({shown}): {detail or 'no reason given'}"


def _json_body(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


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
