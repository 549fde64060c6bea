"""The SSE response of `POST /process`: a run's events as they happen, as a plain ASGI response.

Each event goes out as one message (`event: <type>` and `data: <JSON>`), a `: ping` comment goes out
after `ping_s` of silence, and the client hanging up cancels the run. Three tasks per stream and one
`send` per event: with dozens of runs at once, a general SSE library's per-message machinery (a task
group, a cancel scope and a timeout around every send) was a tenth of the server's CPU (B7).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .events import _Event

PING = b": ping\n\n"


def encode(event: _Event) -> bytes:
    """One SSE message. The JSON is on one line: `model_dump_json` escapes every newline."""
    return b"event: " + event.type.encode() + b"\ndata: " + event.model_dump_json().encode() + b"\n\n"


class EventStreamResponse(Response):
    """Streams `events`; `on_close` is called once the stream ends, however it ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[_Event, None], on_close: Callable[[], None], *, ping_s: float,
                 headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.on_close = on_close
        self.ping_s = ping_s
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", **(headers or {})})
        self._last_sent = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self._last_sent = loop.time()
            pump = asyncio.ensure_future(self._pump(send))
            helpers = [asyncio.ensure_future(self._watch(receive)), asyncio.ensure_future(self._ping(send))]
            try:
                await asyncio.wait([pump, helpers[0]], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, *helpers):
                    task.cancel()
                await asyncio.gather(pump, *helpers, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            try:
                await self.events.aclose()
            finally:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        async for event in self.events:
            await send({"type": "http.response.body", "body": encode(event), "more_body": True})
            self._last_sent = loop.time()

    async def _ping(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self._last_sent + self.ping_s - loop.time(), 0.0))
            if loop.time() - self._last_sent >= self.ping_s:
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                self._last_sent = loop.time()

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
