"""`/mcp`: the MCP server over streamable HTTP, inside the service, behind the same token as the API.

The SDK's session manager serves the route; its lifespan (`McpHttp.running`) runs inside the app's.
The SDK's own Host/Origin check is off here because the app's guards already cover every route (the
`Host` header against RLM_ALLOWED_HOSTS, cross-origin reads only from RLM_CORS_ORIGINS), and a second
list of hosts would refuse names the service is configured to answer to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import bearer_matches
from .config import Settings
from .engine import Engine
from .mcp_server import RlmTools, build_server
from .streaming import RunSlots

PATH = "/mcp"


class _RequireToken:
    """An ASGI app that lets requests through to `app` only with `Authorization: Bearer <RLM_API_TOKEN>`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.token = settings.rlm_api_token.get_secret_value().encode() if settings.rlm_api_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is not None and not bearer_matches(Headers(scope=scope).get("authorization"), self.token):
            refusal = JSONResponse(
                {
                    "detail": "this server needs a token: send 'Authorization: Bearer "
                    "<RLM_API_TOKEN>' (in an MCP host's configuration: a header)"
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class McpHttp:
    """The `/mcp` route and the lifespan of its session manager."""

    def __init__(self, settings: Settings, slots: RunSlots, engine: Callable[[], Engine]) -> None:
        self.server = build_server(RlmTools(settings, slots, engine), local_files=False)
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            max_request_body_size=int(settings.rlm_max_json_bytes),
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.route = Route(PATH, endpoint=_RequireToken(self.server.session_manager.handle_request, settings))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.server.session_manager.run():
            yield
