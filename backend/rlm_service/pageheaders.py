"""Security headers on every response: what the page may load and connect to, and that it is never framed.

The policy lets the page load only its own files, connect only to the server that served it, and show
images only from that server or from `data:`/`blob:` URLs (the figures), so an answer written by a model
cannot make the browser send the user's data anywhere. The interactive API docs (`/docs`, `/redoc`) load
Swagger UI and ReDoc from their CDN with an inline script: they get every header but the policy.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


def page_headers(path: str, docs_paths: Collection[str] = DOCS_PATHS) -> dict[str, str]:
    """The headers a response to `path` carries."""
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    if path not in docs_paths:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return headers


class PageHeadersMiddleware:
    """Adds `page_headers` to every HTTP response, keeping any of them a route set itself."""

    def __init__(self, app: ASGIApp, docs_paths: Collection[str] = DOCS_PATHS) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = page_headers(scope["path"], self.docs_paths)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
