"""Routes over the run history: list, open, delete and export past runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from . import export
from .store import RunRecord, RunStillLive, RunStore, StoreUnavailable, off_loop, shown_id, valid_run_id

T = TypeVar("T")


SETTLE_S = 2.0
"""How long a history read waits for this process's writes still queued (a run that just ended is listed)."""


def _store(request: Request) -> RunStore:
    store: RunStore | None = getattr(request.app.state, "store", None)
    if store is None:
        raise HTTPException(404, "run history is off on this server (RLM_HISTORY_DB=off)")
    return store


async def _settled(request: Request) -> RunStore:
    """The store, once what this process recorded so far is written (or `SETTLE_S` has passed): the history is
    written by a thread of its own, so a client that reads it just after a run's last event would otherwise
    find the run missing or unfinished while the machine is busy."""
    store = _store(request)
    await off_loop(store.flush, SETTLE_S)
    return store


async def in_store(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A call of the store, in the store's threads; 503 when the database cannot be reached or written now."""
    try:
        return await off_loop(call, *args, **kwargs)
    except StoreUnavailable as exc:
        raise HTTPException(503, str(exc)) from None


def _run_id(run_id: str) -> str:
    """The `{run_id}` of a route, refused with 404 unless it could name a run (never echoed back whole)."""
    if not valid_run_id(run_id):
        raise HTTPException(404, f"no run {shown_id(run_id)}: not a run id")
    return run_id


RunId = Annotated[str, Depends(_run_id)]
"""A route's `{run_id}` path parameter, checked: use it for every `/api/runs/{run_id}…` route."""


def history_router() -> APIRouter:
    router = APIRouter(prefix="/api/runs", tags=["history"])

    @router.get("")
    async def list_runs(
        request: Request,
        limit: int = Query(20, ge=1, le=200),
        # finite only: NaN placed no page, and each database read it its own way (SQLite none, PostgreSQL every run)
        before: float | None = Query(None, allow_inf_nan=False, description="`next_before` of the previous page"),
        before_id: str | None = Query(
            None, max_length=64, description="`next_before_id` of the previous page (with `before`)"
        ),
    ) -> dict[str, Any]:
        """Past runs, newest first (runs created at the same time by id, descending), a page at a time: the next
        page is `before=next_before&before_id=next_before_id`. Without `before_id`, a page holds runs created
        before `before` only, and runs created at the same time as the previous page's last one are skipped.
        Prompts and answers come as previews (`prompt_preview`, `prompt_chars`, `answer_preview`,
        `answer_chars`); `GET /api/runs/{id}` has them in full."""
        if before_id is not None and before is None:
            raise HTTPException(422, "before_id places a page only with before (next_before of the page before)")
        store = await _settled(request)
        records = await in_store(store.list, limit=limit, before=before, before_id=before_id)
        runs = [record.to_dict() for record in records]
        last = runs[-1] if len(runs) == limit else None
        return {
            "runs": runs,
            "next_before": last["created"] if last else None,
            "next_before_id": last["id"] if last else None,
        }

    async def _load(request: Request, run_id: str) -> tuple[RunRecord, list[dict[str, Any]]]:
        found = await in_store((await _settled(request)).get, run_id)
        if found is None:
            raise HTTPException(404, f"no run {shown_id(run_id)} in the history")
        return found

    @router.get("/{run_id}")
    async def get_run(request: Request, run_id: RunId) -> dict[str, Any]:
        """One run with every event it streamed, in order."""
        record, events = await _load(request, run_id)
        return {"run": record.to_dict(), "events": events}

    @router.delete(
        "/{run_id}",
        status_code=204,
        responses={
            404: {"description": "Unknown run"},
            409: {"description": "The run is still running"},
            503: {"description": "The history cannot be written now"},
        },
    )
    async def delete_run(request: Request, run_id: RunId) -> Response:
        """Forget a run (and its kept input, if any). 409 while the run is still running, here or in another
        process (cancel it first); 503 when the history cannot be written now (a full disk)."""
        store = _store(request)
        run = request.app.state.engine.runs.get(run_id)
        try:
            if run is not None and not run.ended:  # its first write may still be on its way
                raise RunStillLive(run_id)
            deleted = await in_store(store.delete, run_id)
        except RunStillLive:
            message = f"run {run_id} is still running: cancel it first (POST /api/runs/{run_id}/cancel)"
            raise HTTPException(409, message) from None
        if not deleted:
            raise HTTPException(404, f"no run {shown_id(run_id)} in the history")
        request.app.state.engine.runs.forget(run_id)  # its events are no longer served from memory either
        return Response(status_code=204)

    @router.get("/{run_id}/export")
    async def export_run(request: Request, run_id: RunId, format: Literal["json", "md"] = Query("json")) -> Response:
        """The run as a JSON document or a Markdown report, as a download."""
        record, events = await _load(request, run_id)
        # In a thread: a run of thousands of events takes a tenth of a second or more to render.
        render = export.export_markdown if format == "md" else export.export_json
        body = await asyncio.to_thread(render, record, events)
        media = "text/markdown; charset=utf-8" if format == "md" else "application/json"
        headers = {"Content-Disposition": f'attachment; filename="rlm-run-{record.id}.{format}"'}
        return Response(body, media_type=media, headers=headers)

    @router.get("/{run_id}/input")
    async def get_input(request: Request, run_id: RunId) -> StreamingResponse:
        """The run's input, when the run asked to keep it (`settings.keep_input`)."""
        kept = await in_store(_store(request).read_input, run_id)
        if kept is None:
            raise HTTPException(404, f"run {shown_id(run_id)} did not keep its input")
        headers = {
            "Content-Length": str(kept.size),
            "Content-Disposition": f'attachment; filename="rlm-input-{run_id}.txt"',
        }
        return StreamingResponse(kept.chunks, media_type="text/plain; charset=utf-8", headers=headers)

    return router
