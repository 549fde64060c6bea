"""Starting the service: `rlm-service serve`, `python -m rlm_service serve` and `python backend/main.py`.

Reads the configuration (environment and `.env` files), fails at once with one line naming a bad variable,
hardens the process, and serves the API and the web UI on HOST:PORT with uvicorn.

The event loop is asyncio's own, not uvloop: the REPL workers' channels and pipes are handed to it as
sockets and file descriptors whose ownership uvloop treats differently.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fastapi import FastAPI

from .capacity import Capacity
from .config import ENV_FILES, ConfigError, Settings, env_files_found, load_settings
from .security import harden_server_process

log = logging.getLogger("rlm_service")


def configure(**overrides: object) -> Settings:
    """The settings, with logging set up and the process hardened; exits with status 2 and one line on
    stderr when the configuration is bad."""
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.rlm_log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request would drown the one line per run
        logging.getLogger(noisy).setLevel(logging.WARNING)
    read = env_files_found()
    if read:
        log.info(
            "Settings read from the environment, then %s: the first that sets a variable wins.",
            ", then ".join(str(path) for path in reversed(read)),
        )
    else:
        log.info(
            "Settings read from the environment; no .env file here (looked for %s in %s).",
            " and ".join(reversed(ENV_FILES)),
            Path.cwd(),
        )
    harden_server_process()
    problem = settings.setup_problem()
    if problem:
        log.warning("%s /health and the UI work; /process answers 503.", problem)
    return settings


def build_app(settings: Settings, *, runs: Capacity | None = None, sessions: Capacity | None = None) -> FastAPI:
    """The application, with the collector settled on what the imports left behind. `runs` and `sessions`
    count over every process of the instance when it has several (`supervisor`)."""
    from .api import create_app
    from .runtime import settle_heap

    app = create_app(settings, runs=runs, sessions=sessions)
    settle_heap()
    return app


def serve(settings: Settings, app: FastAPI) -> None:
    """Serve `app` on the configured host and port until stopped."""
    import uvicorn

    processes = settings.web_concurrency
    print(
        f"RLM service on http://{settings.host}:{settings.port} "
        f"(model: {settings.root_model or 'not set'}, REPL: {settings.rlm_repl}"
        + (f", {processes} processes" if processes > 1 else "")
        + ")",
        flush=True,
    )
    if processes > 1:
        from .supervisor import serve_processes

        serve_processes(settings, processes)
        return
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.rlm_log_level,
        loop="asyncio",
        timeout_graceful_shutdown=5,
    )
