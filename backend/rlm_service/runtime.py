"""The server process's interpreter settings: how its garbage collector treats a long-lived heap."""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 10_000
"""Allocations (net of frees) between collections of young objects; CPython's default is 700."""


def settle_heap() -> None:
    """Keep the garbage collector off what lives as long as the process; call once, after the imports.

    Everything imported by then (FastAPI, PydanticAI, pydantic's schemas: about 150,000 objects) is moved
    out of the collector's reach, and young objects are collected in larger steps, so that most of a
    run's short-lived objects are already freed when a collection comes. Measured during 32 runs at once
    (BENCHMARKS.md, B7): the collector took about 5 ms of CPU per run, with pauses of over 100 ms on the
    event loop at each full collection; after this, under 1 ms per run, and a full collection no longer
    walks the imported modules.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
