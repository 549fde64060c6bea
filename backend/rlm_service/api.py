"""The HTTP service: `POST /process` streams a run as Server-Sent Events; the UI and a few JSON routes.

This layer knows requests and events, not REPL internals: it validates, refuses early with a JSON
error, then hands the run to the engine and encodes each event as one SSE message.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from . import __version__
from .config import Settings
from .engine import Engine, RunSettings, SettingsRefused, effective_limits
from .history import history_router
from .sse import EventStreamResponse
from .store import SqliteRunStore
from .uploads import FORM_OVERHEAD_BYTES, ParsedRequest, ProcessRequest, RequestRefused, read_json, read_multipart

log = logging.getLogger("rlm_service.api")

FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"
PING_SECONDS = 10


class RunSlots:
    """Counts runs in progress; past the limit, new runs are refused with 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_take(self) -> Callable[[], None] | None:
        if self.active >= self.limit:
            return None
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release


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
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "settings": {"type": "string", "description": "JSON text of the settings object"},
                    "input_file": {"type": "string", "format": "binary"},
                },
            }},
        },
    }
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings, *, engine: Engine | None = None, ping_s: float = PING_SECONDS,
               **engine_kwargs: Any) -> FastAPI:
    """Build the app. The engine (its zygote, its model clients) is built inside the running loop, at startup.
    `ping_s`: seconds of silence after which a run's stream gets a keep-alive comment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        store = None
        if own and settings.history_path is not None:
            store = SqliteRunStore(settings.history_path)
        app.state.engine = engine or Engine(settings, store=store, **engine_kwargs)
        app.state.store = app.state.engine.store
        if own:
            await app.state.engine.start()
        try:
            yield
        finally:
            if own:
                await app.state.engine.aclose()
            if store is not None:
                store.close()

    app = FastAPI(title="RLM service", version=__version__, lifespan=lifespan,
                  description="A Recursive Language Model: a root model drives a Python REPL that holds "
                              "the input, and delegates reading to sub-models. `POST /process` streams "
                              "the run as Server-Sent Events.")
    app.state.settings = settings
    slots = RunSlots(settings.rlm_max_concurrent_runs)
    app.state.slots = slots
    app.add_middleware(CORSMiddleware, allow_origins=settings.rlm_cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type"])

    token = settings.rlm_api_token.get_secret_value().encode() if settings.rlm_api_token else None

    async def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise RequestRefused(401, "missing or wrong token: send 'Authorization: Bearer <RLM_API_TOKEN>'",
                                 {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestRefused)
    async def _refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers or None)

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
            "auth_required": token is not None,
            "history": settings.history_path is not None,
            "protocol": settings.rlm_root_protocol,
            "repl": settings.rlm_repl,
            "limits": {
                "max_iterations": settings.rlm_max_iterations,
                "max_subcalls": settings.rlm_max_subcalls,
                "exec_timeout_s": settings.rlm_exec_timeout_s,
                "subcall_concurrency": settings.rlm_subcall_concurrency,
                "max_output_chars": settings.rlm_max_output_chars,
                "max_input_bytes": settings.rlm_max_input_bytes,
                "max_concurrent_runs": settings.rlm_max_concurrent_runs,
            },
            "active_runs": slots.active,
        }

    @app.post("/process", tags=["runs"], dependencies=[Depends(require_token)],
              responses={200: {"content": {"text/event-stream": {}}, "description": "The run, as SSE."},
                         400: {"description": "Malformed body"}, 401: {"description": "Bad or missing token"},
                         413: {"description": "Input too large"}, 415: {"description": "Unsupported type"},
                         422: {"description": "Invalid fields"}, 429: {"description": "Too many runs"},
                         503: {"description": "No model configured"}})
    async def process(request: Request) -> Any:
        """Start a run and stream its events. JSON body, or multipart with an `input_file` upload."""
        problem = settings.setup_problem()
        if problem:
            raise RequestRefused(503, problem)
        release = slots.try_take()
        if release is None:
            raise RequestRefused(429, f"{slots.limit} runs are already in progress (RLM_MAX_CONCURRENT_RUNS); "
                                      "retry when one has finished", {"Retry-After": "5"})
        try:
            parsed = await _read_request(request, settings)
            try:
                effective_limits(settings, parsed.settings)  # refuse now, before the stream starts
            except SettingsRefused as exc:
                parsed.run_input.discard()
                raise RequestRefused(422, str(exc)) from None
        except BaseException:
            release()
            raise

        def finish() -> None:
            release()
            parsed.run_input.discard()

        engine: Engine = request.app.state.engine
        events = engine.run(parsed.prompt, parsed.run_input, parsed.settings)
        return EventStreamResponse(events, finish, ping_s=ping_s, headers={"X-Accel-Buffering": "no"})

    app.include_router(history_router(), dependencies=[Depends(require_token)])
    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]
    _serve_frontend(app)
    return app


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


async def _read_request(request: Request, settings: Settings) -> ParsedRequest:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    limit = settings.rlm_max_input_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
        raise RequestRefused(413, f"the body ({int(declared):,} bytes) is larger than RLM_MAX_INPUT_BYTES "
                                  f"({limit:,} bytes)")
    if media_type == "application/json":
        return await read_json(request.stream(), limit, settings.rlm_body_timeout_s)
    if media_type == "multipart/form-data":
        return await read_multipart(request.stream(), content_type, limit, settings.rlm_body_timeout_s)
    shown = media_type or "none"
    raise RequestRefused(415, f"unsupported Content-Type ({shown}): send application/json or multipart/form-data")


__all__ = ["RunSettings", "create_app"]
