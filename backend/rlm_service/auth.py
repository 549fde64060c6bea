"""The API token: `Authorization: Bearer <RLM_API_TOKEN>` on `/process` and `/api/*` when it is set."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .config import Settings

TokenCheck = Callable[..., Awaitable[None]]

_bearer = HTTPBearer(auto_error=False, description="RLM_API_TOKEN, when the server sets one.")


def token_check(settings: Settings) -> TokenCheck:
    """A FastAPI dependency that refuses requests without the token (401), or lets all through when unset.

    The comparison takes constant time, so the token cannot be guessed from response times. With a
    token, OpenAPI (`/docs`) documents the bearer scheme on every route that needs it.
    """
    if settings.rlm_api_token is None:

        async def open_access() -> None:
            return None

        return open_access
    token = settings.rlm_api_token.get_secret_value().encode()

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, token):
            detail = (
                "wrong token: send 'Authorization: Bearer <RLM_API_TOKEN>'"
                if credentials
                else "this server needs a token: send 'Authorization: Bearer <RLM_API_TOKEN>'"
            )
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    return require_token


def bearer_matches(authorization: str | None, token: bytes) -> bool:
    """Whether an `Authorization` header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(given.strip().encode() if scheme.lower() == "bearer" else b"", token)
