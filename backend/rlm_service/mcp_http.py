"""`/mcp`: the MCP server over streamable HTTP, inside the service, behind the same token as the API.

The SDK's session manager serves the route; its lifespan (`McpHttp.running`) runs inside the app's.
The SDK's own Host/Origin check is off here because the app's guards already cover every route (the
`Host` header against RLM_ALLOWED_HOSTS, cross-origin reads only from RLM_CORS_ORIGINS), and a second
list of hosts would refuse names the service is configured to answer to.

A POSTed body reaches the SDK only once it has been read like the API's bodies (`_ReadBody`): counted
against the bodies being read, cut off when it stalls or trickles (408) or passes RLM_MAX_JSON_BYTES (413),
and refused when it holds more JSON values than any request needs (413), since the SDK parses it on the
event loop. These refusals, and the token's (401), are JSON-RPC errors, whose message MCP clients show.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import HTTPException
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import bearer_matches
from .config import Settings
from .engine import Engine
from .fleet import Fleet
from .mcp_server import RlmTools, build_server
from .streaming import RunSlots
from .uploads import BodyLimits, json_too_large, read_json_bytes

log = logging.getLogger("rlm_service")

PATH = "/mcp"
MAX_BODY_BYTES = 8 * 1024**2
"""The largest `/mcp` body: the MCP SDK parses bodies on the event loop itself, and one this size takes it a few
tens of milliseconds; larger inputs go as files (stdio) or to `POST /process`."""
MAX_MCP_SESSIONS = 1000
"""MCP sessions kept at once (2025-protocol hosts, one process): past it a new one is refused (503). Each holds some
30 kB of the server's memory; the SDK's default, 10,000, let one holder of the token take 300 MB."""
MCP_SESSION_IDLE_S = 1800.0
"""An MCP session with no request in flight for this long ends (a call under way keeps it). As the SDK's default:
a host idle longer must start a new session, which the SDK's own client does not do by itself."""


def _refusal(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A request refused before the SDK sees it, as a JSON-RPC error: MCP clients show its message (the SDK's
    client shows of any other error body only "Server returned an error response"). `detail` too, as the API's
    refusals have it."""
    error = {"code": INVALID_REQUEST if status < 500 else INTERNAL_ERROR, "message": detail}
    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": error, "detail": detail}, status, headers)


class _RequireToken:
    """An ASGI app that lets requests through to `app` only with `Authorization: Bearer <RLM_API_TOKEN>`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.token = settings.rlm_api_token.get_secret_value().encode() if settings.rlm_api_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is not None and not bearer_matches(Headers(scope=scope).get("authorization"), self.token):
            refusal = _refusal(
                401,
                "this server needs a token: send 'Authorization: Bearer <RLM_API_TOKEN>' (in an MCP host's "
                "configuration: a header)",
                {"WWW-Authenticate": "Bearer"},
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _ReadBody:
    """An ASGI app that reads a POST's body (`read_json_bytes`, counted in `slots`) and hands it to `app` in one
    piece; a refusal is answered here, `{"detail": ...}` like the API's."""

    def __init__(self, app: ASGIApp, settings: Settings, slots: RunSlots) -> None:
        self.app = app
        self.limits = replace(
            BodyLimits.of(settings),
            json_bytes=min(settings.rlm_max_json_bytes, MAX_BODY_BYTES),
            json_cap_name="/mcp",
            larger="give a large input as a file instead (`input_path`, over stdio: `rlm-service mcp`), or send "
            "it to POST /process as a multipart upload",
        )
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        declared = request.headers.get("content-length", "")
        try:
            if declared.isdigit() and (refusal := json_too_large(self.limits, int(declared))) is not None:
                raise refusal
            with self.slots.reading_body():
                body = await read_json_bytes(request.stream(), self.limits)
        except HTTPException as exc:
            await _refusal(exc.status_code, str(exc.detail), exc.headers)(scope, receive, send)
            return
        delivered = finished = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watched(message: Message) -> None:
            nonlocal finished
            finished = finished or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        await self.app(scope, replay, watched)
        if not finished and "mcp-session-id" in request.headers and (call := _call_id(body)) is not None:
            # The client left before the call's result: with a session kept here (the 2025 protocol) the SDK would
            # serve the call on, for no one (there is no event store to resume from), its run holding a slot and
            # calling the model. It is cancelled as the client would cancel it. (With an event store, a client
            # could come back for the result: this would then have to go.)
            await self._cancel_call(scope, call)

    async def _cancel_call(self, scope: Scope, call: str | int) -> None:
        """Send the SDK the `notifications/cancelled` for request `call` of the request's session."""
        notice = json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": call, "reason": "the client's connection closed before the result"},
            }
        ).encode()
        replaced = (b"content-type", b"content-length", b"accept")
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in replaced]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(notice)).encode()),
            (b"accept", b"application/json, text/event-stream"),
        ]
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": notice, "more_body": False}

        async def ignore(message: Message) -> None:
            pass

        try:
            await self.app({**scope, "headers": headers}, receive, ignore)
        except Exception:  # the session ended meanwhile, say: then its calls have been cancelled with it
            log.debug("cancelling an MCP call whose client left", exc_info=True)


def _call_id(body: bytes) -> str | int | None:
    """The id of the `tools/call` request in `body`, if that is what it is."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("method") == "tools/call":
        call = message.get("id")
        return call if isinstance(call, (str, int)) and not isinstance(call, bool) else None
    return None


class McpHttp:
    """The `/mcp` route and the lifespan of its session manager."""

    def __init__(
        self, settings: Settings, slots: RunSlots, engine: Callable[[], Engine], fleet: Callable[[], Fleet | None]
    ) -> None:
        self.server = build_server(RlmTools(settings, slots, engine, fleet), local_files=False)
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            max_request_body_size=MAX_BODY_BYTES,
            # With several processes or replicas, each request may reach another one: nothing of an MCP
            # connection may live in one process's memory. (Clients of the 2026 protocol revision are served
            # that way anyway; those of the 2025 handshake lose only cancellation by notification there.)
            stateless_http=settings.web_concurrency > 1 or settings.rlm_database_url is not None,
            max_sessions=MAX_MCP_SESSIONS,
            session_idle_timeout=MCP_SESSION_IDLE_S,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        handler = _ReadBody(self.server.session_manager.handle_request, settings, slots)
        self.route = Route(PATH, endpoint=_RequireToken(handler, settings))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.server.session_manager.run():
            yield
