"""The server process's interpreter settings: how its garbage collector treats a long-lived heap."""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 10_000
"""Allocations (net of frees) between collections of young objects; CPython's default is 700."""


def settle_heap() -> None:
    """Keep the garbage collector off what lives as long as the process; call once, after the imports.

    Everything imported by then (FastAPI, PydanticAI, pydantic's schemas) is moved out of the collector's
    reach, so that a full collection does not walk it and stall the event loop, and young objects are
    collected in larger steps, so that most of a run's short-lived objects are already freed when a
    collection comes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
