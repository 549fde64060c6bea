"""The HTTP service: wires the routes (runs, history, the page) and what guards them all.

Guards, outermost first: the `Host` header must be one this server answers to (RLM_ALLOWED_HOSTS; on
loopback only loopback names, so a DNS-rebinding page cannot reach a local server), cross-origin
reads only from RLM_CORS_ORIGINS (none by default), and the token on `/process` and `/api/*`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import __version__
from .auth import token_check
from .capacity import Capacity, LocalCapacity
from .config import Settings
from .engine import Engine
from .fleet import Fleet
from .history import history_router
from .mcp_http import McpHttp
from .openai_api import is_openai_path, openai_router, routing_refusal
from .pageheaders import PageHeadersMiddleware
from .store import open_store
from .store_sql import SqlRunStore
from .streaming import RunSlots, run_router
from .uploads import ProcessRequest

log = logging.getLogger("rlm_service.api")

_PACKAGE_DIR = Path(__file__).resolve().parent
FRONTEND_DIR = next(
    (path for path in (_PACKAGE_DIR / "frontend", _PACKAGE_DIR.parents[1] / "frontend") if path.is_dir()),
    _PACKAGE_DIR.parents[1] / "frontend",
)
"""The page: package data of an installed `rlm-service`, or the repository's `frontend/` in a checkout."""
PING_SECONDS = 10


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    request_schema = ProcessRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schema.pop("$defs", {}))
    components["ProcessRequest"] = request_schema
    schema["paths"]["/process"]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ProcessRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {
                        "prompt": {"type": "string", "minLength": 1},
                        "settings": {"type": "string", "description": "JSON text of the settings object"},
                        "input_file": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
    app.openapi_schema = schema
    return schema


STOP_RUNS_S = 3.0
"""How long a stopping server waits for its cancelled runs to end before it ends the streams left (`stop_runs`)."""


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    ping_s: float = PING_SECONDS,
    runs: Capacity | None = None,
    sessions: Capacity | None = None,
    **engine_kwargs: Any,
) -> FastAPI:
    """Build the app. The engine (its zygote, its model clients) is built inside the running loop, at startup.
    `ping_s`: seconds of silence after which a stream gets a keep-alive comment; `runs` and `sessions`:
    the instance's counts when it has several processes (one process: counted here)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        store = await asyncio.to_thread(open_store, settings) if own else None
        app.state.engine = engine or Engine(settings, store=store, sessions=sessions, **engine_kwargs)
        app.state.store = app.state.engine.store
        fleet: Fleet | None = None
        if own:
            await app.state.engine.start()
            if settings.coordinated and isinstance(store, SqlRunStore):
                fleet = Fleet(
                    settings, store, app.state.engine, launch=slots.follow_up_launcher(lambda: app.state.engine)
                )
                await fleet.start()
        app.state.fleet = fleet
        app.state.loop = asyncio.get_running_loop()
        try:
            async with mcp.running():
                yield
        finally:
            if own:
                await app.state.engine.aclose()
            if fleet is not None:
                await fleet.stop()
            if store is not None:
                store.close()

    app = FastAPI(
        title="RLM service",
        version=__version__,
        lifespan=lifespan,
        description="A Recursive Language Model: a root model drives a Python REPL that holds "
        "the input, and delegates reading to sub-models. `POST /process` streams "
        "the run as Server-Sent Events.",
    )
    app.state.settings = settings
    slots = RunSlots(runs or LocalCapacity(settings.rlm_max_concurrent_runs))
    app.state.slots = slots
    if settings.rlm_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.rlm_cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            # Any request header: the official clients send headers of their own (the OpenAI SDK's
            # `X-Stainless-*`, MCP's `Mcp-Session-Id` and `Mcp-Protocol-Version`), and none is a credential a
            # browser adds by itself (the token is a bearer header a page must set). The origins are the gate.
            allow_headers=["*"],
            # what a page reads off the responses: an MCP client the session it was given, its run's id, a wait
            expose_headers=["Mcp-Session-Id", "X-Run-ID", "Retry-After"],
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(PageHeadersMiddleware)
    require_token = token_check(settings)

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, str]:
        """Liveness: answers without touching any model."""
        return {"status": "ok"}

    @app.get("/api/config", tags=["service"], dependencies=[Depends(require_token)])
    async def config() -> dict[str, Any]:
        """What the UI needs to know: models, limits, whether a key is configured. Never a secret."""
        return {
            "version": __version__,
            "model": settings.root_model,
            "sub_model": settings.sub_model,
            "api_base": settings.openai_api_base,
            "key_configured": settings.api_key_configured,
            "setup_problem": settings.setup_problem(),
            "auth_required": settings.rlm_api_token is not None,
            "history": settings.history_kept,
            "protocol": settings.rlm_root_protocol,
            "repl": settings.rlm_repl,
            "limits": {
                "max_iterations": settings.rlm_max_iterations,
                "max_subcalls": settings.rlm_max_subcalls,
                "exec_timeout_s": settings.rlm_exec_timeout_s,
                "subcall_concurrency": settings.rlm_subcall_concurrency,
                "max_output_chars": settings.rlm_max_output_chars,
                "max_input_bytes": settings.rlm_max_input_bytes,
                "max_json_bytes": settings.rlm_max_json_bytes,
                "max_prompt_chars": settings.rlm_max_prompt_chars,
                "max_concurrent_runs": settings.rlm_max_concurrent_runs,
            },
            "active_runs": slots.active,
        }

    app.include_router(run_router(settings, slots, ping_s=ping_s), dependencies=[Depends(require_token)])
    app.include_router(history_router(), dependencies=[Depends(require_token)])
    app.include_router(openai_router(settings, slots, ping_s=ping_s))
    app.exception_handler(StarletteHTTPException)(_http_refusal)
    mcp = McpHttp(settings, slots, lambda: app.state.engine, lambda: getattr(app.state, "fleet", None))
    app.router.routes.append(mcp.route)
    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]
    _serve_frontend(app)
    return app


async def _http_refusal(request: Request, exc: StarletteHTTPException) -> Response:
    """An HTTP refusal outside any route's own handling (routing's 404 and 405, mostly): in OpenAI's shape under
    /v1, FastAPI's everywhere else."""
    if is_openai_path(request.url.path):
        return routing_refusal(request, exc)
    return await http_exception_handler(request, exc)


def stop_runs(app: FastAPI, then: Callable[[], None]) -> None:
    """The server has been asked to stop (called from its signal handler, at any point of the loop's work): from
    now on no run starts (503), and the live runs are cancelled at once, so that each client gets its run's end
    while its connection still stands: the `error` event of a stream, the error answer of a non-streamed chat
    completion or an MCP call. `then` (ending the streams still open) is called once they have ended, or after
    STOP_RUNS_S. Left to the app's shutdown, the cancellation would come only after uvicorn's grace for open
    connections, which ends by cutting them (a non-streamed request gets a bare 500)."""
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is None or loop.is_closed():
        then()  # still starting, or already stopped: no run to end
        return

    def begin() -> None:
        app.state.stopping = loop.create_task(_end_runs(app.state.engine, app.state.slots, then))

    loop.call_soon_threadsafe(begin)


async def _end_runs(engine: Engine, slots: RunSlots, then: Callable[[], None]) -> None:
    try:
        ending = slots.stop() + [run.task for run in engine.cancel_live() if run.task is not None]
        if ending:
            await asyncio.wait(ending, timeout=STOP_RUNS_S)  # (not cancelling them, unlike a timeout scope)
            await asyncio.sleep(0.5)  # their last events and answers, on their way to the clients
    finally:
        then()


def _serve_frontend(app: FastAPI) -> None:
    """The page's own files by name (so that unknown paths stay JSON 404s), and its vendored libraries."""
    if not FRONTEND_DIR.is_dir():
        return
    for path in sorted(FRONTEND_DIR.iterdir()):
        if path.is_file():
            routes = ["/", f"/{path.name}"] if path.name == "index.html" else [f"/{path.name}"]
            for route in routes:
                app.add_api_route(route, _file_endpoint(path), methods=["GET"], include_in_schema=False)
    if (FRONTEND_DIR / "vendor").is_dir():
        app.mount("/vendor", StaticFiles(directory=FRONTEND_DIR / "vendor"), name="vendor")


def _file_endpoint(path: Path) -> Callable[[], Any]:
    async def serve() -> FileResponse:
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve
