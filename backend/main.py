"""Start the RLM service: `python backend/main.py`, the same as `rlm-service serve` once installed (or
`uvicorn main:app --app-dir backend --loop asyncio`, which ends fewer things cleanly at a stop). See
`rlm_service.server`.

Run as a script, this file's own directory is first on `sys.path`, so `rlm_service` is found beside it.
"""

from __future__ import annotations

from rlm_service.server import build_app, configure, serve

settings = configure()
app = build_app(settings)


if __name__ == "__main__":
    serve(settings, app)
