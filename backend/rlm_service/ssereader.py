"""The command line's reader of Server-Sent Events, as the format specifies them.

Lines end at CR, LF or CRLF and nowhere else (text such as U+2028 stays inside its line, as it would not
with `str.splitlines`), `data:` lines join with newlines, `id:` is kept from event to event, comments are
skipped. Bytes come in pieces as the network delivers them: a line end or a UTF-8 character cut between two
pieces is read whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_EVENT_BYTES = 256 * 1024**2
"""Largest event read from a server: a final answer is one event, and answers may be large."""

_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(Exception):
    """An event longer than the decoder's limit."""


@dataclass(frozen=True)
class StreamedEvent:
    """One event of a run as the server sent it: its name, its data (text) and the last event id."""

    name: str
    data: str
    id: str


@dataclass
class SseDecoder:
    """Server-Sent Events from the bytes of a stream, in pieces as they arrive. Lines are split as bytes,
    so only CR and LF end them; each line is then read as UTF-8."""

    max_event_bytes: int = MAX_EVENT_BYTES
    _buffer: bytearray = field(default_factory=bytearray)
    _skip_lf: bool = False  # the last piece ended in CR: an LF starting the next one belongs to it
    _name: str = ""
    _data: list[str] = field(default_factory=list)
    _size: int = 0
    _last_id: str = ""

    def feed(self, piece: bytes) -> list[StreamedEvent]:
        """The events that `piece` completes; raises `EventTooLarge` past `max_event_bytes`."""
        if self._skip_lf and piece[:1] == b"\n":
            piece = piece[1:]
        self._skip_lf = False
        scanned = len(self._buffer)  # what is buffered holds no line end
        self._buffer += piece
        events, start = [], 0
        for end in _LINE_END.finditer(self._buffer, scanned):
            event = self._line(self._buffer[start : end.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end.end()
            self._skip_lf = end.group() == b"\r" and start == len(self._buffer)
        del self._buffer[:start]
        if self._size + len(self._buffer) > self.max_event_bytes:
            raise EventTooLarge(f"the server sent an event larger than {self.max_event_bytes:,} bytes")
        return events

    def _line(self, line: str) -> StreamedEvent | None:
        if not line:
            event = StreamedEvent(self._name or "message", "\n".join(self._data), self._last_id) if self._data else None
            self._name, self._data, self._size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1  # the line end that joins it: endless empty `data:` lines count too
        elif name == "event":
            self._name = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None
