"""Start the RLM service: `python backend/main.py` (or `uvicorn main:app --app-dir backend --loop asyncio`).

The event loop is asyncio's own: the REPL workers' channels and pipes are handed to it as sockets and
file descriptors whose ownership uvloop treats differently (seen as closed descriptors under load),
and uvloop measured no faster here (BENCHMARKS.md, B7).

Reads the configuration (environment and `.env`), fails at once with one line naming a bad variable,
hardens the process, and serves the API and the web UI on HOST:PORT.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rlm_service.api import create_app
from rlm_service.config import ConfigError, Settings, load_settings
from rlm_service.runtime import settle_heap
from rlm_service.security import harden_server_process


def _configure() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.rlm_log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request would drown the one line per run
        logging.getLogger(noisy).setLevel(logging.WARNING)
    harden_server_process()
    problem = settings.setup_problem()
    if problem:
        logging.getLogger("rlm_service").warning("%s /health and the UI work; /process answers 503.", problem)
    return settings


settings = _configure()
app = create_app(settings)
settle_heap()


def main() -> None:
    import uvicorn

    print(f"RLM service on http://{settings.host}:{settings.port} "
          f"(model: {settings.root_model or 'not set'}, REPL: {settings.rlm_repl})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.rlm_log_level,
                loop="asyncio", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
