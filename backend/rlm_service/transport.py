"""The HTTP client of root-model requests: httpx2, with one deadline for each whole response.

httpx's timeouts apply to each network operation, so a model server that trickles a byte a second
never trips them; `DeadlineTransport` gives every request one deadline instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2


class DeadlineTransport(httpx2.AsyncBaseTransport):
    """Caps the whole of each request, body included, at its read timeout.

    httpx's timeouts apply to each network operation, so a server that trickles a byte a second never
    trips them. This transport gives every request one deadline: the same number of seconds, counted
    from the start of the request to the last byte of the response.
    """

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        budget = (request.extensions.get("timeout") or {}).get("read")
        if not budget:
            return await self.inner.handle_async_request(request)
        deadline = time.monotonic() + float(budget)
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + float(budget)):
                response = await self.inner.handle_async_request(request)
        except TimeoutError as exc:
            raise httpx2.ReadTimeout(f"no complete response within {budget} s", request=request) from exc
        response.stream = _DeadlineStream(response.stream, deadline, request)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _DeadlineStream(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, deadline: float, request: httpx2.Request) -> None:
        self.inner = inner
        self.deadline = deadline
        self.request = request

    async def __aiter__(self) -> Any:
        iterator = self.inner.__aiter__()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise httpx2.ReadTimeout("the response took too long to arrive", request=self.request)
            try:
                async with asyncio.timeout(remaining):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise httpx2.ReadTimeout("the response took too long to arrive", request=self.request) from exc
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_http_client(*, timeout: float, max_connections: int = 2048) -> httpx2.AsyncClient:
    """The connection pool that root and sub-model requests share, with whole-request deadlines."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=512)
    transport = DeadlineTransport(httpx2.AsyncHTTPTransport(limits=limits))
    return httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(timeout, connect=10.0))
