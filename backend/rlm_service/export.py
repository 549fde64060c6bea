"""A run as a Markdown report: the task, each iteration's prose, code, output and figures, the answer.

Each event type has its renderer in `RENDERERS` (a test checks that every type has one); types that
add nothing to a report, such as progress counters, say so with `_nothing`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from .store import RunRecord

Lines = list[str]
Renderer = Callable[[dict[str, Any]], Lines]


def _fenced(kind: str, text: object) -> Lines:
    """`text` in a code block whose fence is longer than any run of backticks in it (CommonMark): output cannot
    close the block and put its own Markdown or HTML in the report."""
    body = str(text).rstrip()
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{kind}", body, fence, ""]


def _start(event: dict[str, Any]) -> Lines:
    return [f"- **Models**: {event.get('model')} (sub-calls: {event.get('sub_model')})", ""]


def _thought(event: dict[str, Any]) -> Lines:
    return [str(event.get("text", "")), ""]


def _code(event: dict[str, Any]) -> Lines:
    return _fenced("python", event.get("code", ""))


def _output(event: dict[str, Any]) -> Lines:
    lines: Lines = []
    if event.get("stdout"):
        lines += _fenced("text", event["stdout"])
    if event.get("error"):
        lines += ["Error:", "", *_fenced("text", event["error"])]
    return lines


def _figure(event: dict[str, Any]) -> Lines:
    return [f"![figure](data:{event.get('mime', 'image/png')};base64,{event.get('data', '')})", ""]


def _nothing(event: dict[str, Any]) -> Lines:
    """Progress (`subcalls`), the answer as it grows (`answer`), running totals (`usage`): the report
    shows the end state instead."""
    return []


def _final(event: dict[str, Any]) -> Lines:
    usage = event.get("usage") or {}
    root, sub = usage.get("root") or {}, usage.get("sub") or {}
    lines = [
        f"*{event.get('iterations')} iterations, {event.get('elapsed_ms', 0) / 1000:.1f} s; root model "
        f"{root.get('input_tokens', 0):,} input / {root.get('output_tokens', 0):,} output tokens, sub-calls "
        f"{sub.get('requests', 0):,} ({sub.get('input_tokens', 0):,} / {sub.get('output_tokens', 0):,}).*",
        "",
    ]
    if event.get("note"):
        lines += [f"> {event['note']}", ""]
    return lines


def _error(event: dict[str, Any]) -> Lines:
    return ["## Error", "", f"`{event.get('code')}`: {event.get('message')}", ""]


def _child(event: dict[str, Any]) -> Lines:
    kind, data = str(event.get("event")), event.get("data") or {}
    if kind not in ("code", "output", "final", "error"):
        return []
    inner = RENDERERS[kind](data)
    title = f"**Child run, depth {event.get('depth')}** ({kind}):"
    return [f"> {line}" if line else ">" for line in [title, "", *inner]] + [""]


RENDERERS: dict[str, Renderer] = {
    "start": _start,
    "thought": _thought,
    "code": _code,
    "subcalls": _nothing,
    "output": _output,
    "figure": _figure,
    "answer": _nothing,
    "usage": _nothing,
    "final": _final,
    "error": _error,
    "child": _child,
}


def export_json(record: RunRecord, events: list[dict[str, Any]]) -> str:
    """The run and its events as one indented JSON document."""
    return json.dumps({"run": record.to_dict(), "events": events}, ensure_ascii=False, indent=1)


def export_markdown(record: RunRecord, events: list[dict[str, Any]]) -> str:
    """The run as one Markdown document."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.created))
    lines = [
        f"# RLM run {record.id}",
        "",
        f"- **Started**: {when}",
        f"- **Status**: {record.status}",
        f"- **Input**: {record.input_chars:,} characters, {record.input_lines:,} lines"
        + (f" ({record.input_name})" if record.input_name else ""),
        "",
        "## Task",
        "",
        record.prompt,
        "",
    ]
    iteration = None
    for event in events:
        kind = str(event.get("type"))
        if kind in ("thought", "code", "output") and event.get("iteration") != iteration:
            iteration = event.get("iteration")
            lines += [f"## Iteration {iteration}", ""]
        lines += RENDERERS.get(kind, _nothing)(event)
    if record.answer:
        lines += ["## Answer" + ("" if record.ready else " (not marked ready)"), "", record.answer, ""]
    return "\n".join(lines)
