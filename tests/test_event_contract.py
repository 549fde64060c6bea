"""One event contract: `events.py` defines every event type, and every consumer handles every type.

Adding an event type means editing `events.py` and the consumers that render it; these tests name the
consumer that misses one (the page's own check is in tests/test_page.py, in Chromium).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_service.events import EVENT_TYPES, json_schema, parse_event
from rlm_service.export import RENDERERS
from rlm_service.terminal import ProgressPrinter

SHIPPED_SCHEMA = Path(__file__).resolve().parents[1] / "frontend" / "events.schema.json"


def test_the_event_types_are_the_union_of_events_py() -> None:
    schema = json_schema()
    named = {
        variant["properties"]["type"]["const"]
        for variant in schema["$defs"].values()
        if "type" in variant.get("properties", {}) and "const" in variant["properties"]["type"]
    }
    assert named == set(EVENT_TYPES)


@pytest.mark.parametrize(
    "consumer, handled",
    [
        ("the command line's ProgressPrinter.HANDLERS", set(ProgressPrinter.HANDLERS)),
        ("the Markdown export's RENDERERS", set(RENDERERS)),
    ],
)
def test_every_consumer_handles_every_event_type(consumer: str, handled: set[str]) -> None:
    """Mutant caught: deleting any entry of either map (the missing type is named)."""
    missing = set(EVENT_TYPES) - handled
    assert not missing, f"{consumer} does not handle {sorted(missing)}"
    assert not handled - set(EVENT_TYPES), f"{consumer} handles types events.py does not define"


def test_the_page_ships_the_schema_of_this_events_py() -> None:
    """The page reads the event types from frontend/events.schema.json; regenerate it with
    `python -m rlm_service.events > frontend/events.schema.json` after changing events.py."""
    assert json.loads(SHIPPED_SCHEMA.read_text()) == json_schema()


def test_stored_events_parse_back_into_their_types() -> None:
    event = parse_event({"type": "thought", "run_id": "r", "seq": 3, "iteration": 1, "text": "hi", "new_field": 1})
    assert type(event).__name__ == "ThoughtEvent" and event.seq == 3
