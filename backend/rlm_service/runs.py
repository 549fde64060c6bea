"""Runs as server-side resources: their events so far, the clients following them, and how to stop them.

A `LiveRun` is one run on this server. Its driver (the engine's task) appends events as they happen;
each gets the next sequence number. Any number of clients follow it with `follow(after)`: each reads
the shared list from its own position, so a client that reads slowly holds no queue of its own and
costs the run nothing, and a client that reconnects with the last number it saw gets every later event
exactly once. Closing a follower does not stop the run: whoever started it decides (`/process` cancels
it when its client leaves, unless the run was started detached).

What a run holds in memory is bounded by what it is still worth to a follower: an answer superseded by a
later one is kept cut (its text is only the past; the latest answer and `final` carry the whole), and a
large event's stream frame is made once for all its followers rather than once each.

The `RunRegistry` finds runs by id while they live and for a short while after they end, so a client
that reconnects just after the terminal event still gets it even with history off; later, history
(the store) answers.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from .events import AnswerEvent, ChildEvent, Event, EventBase, FigureEvent, is_terminal

ENDED_KEPT_S = 600.0
"""How long an ended run's events stay in memory for clients that re-attach."""
ENDED_KEPT_MAX = 64
"""How many ended runs stay in memory at most (the oldest go first)."""
ENDED_KEPT_CHARS = 256 * 1024**2
"""How much text (answers, outputs, figures) ended runs keep in memory together (the oldest go first)."""
SUPERSEDED_ANSWER_CHARS = 64 * 1024
"""How much of an answer a run keeps once a later answer has replaced it."""
LIVE_FIGURE_CHARS = 64 * 1024**2
"""How much figure data a run keeps in memory; past it, its oldest figures are kept without their image (every
cell may send up to 8 figures of 2 MB, and a run may have hundreds of cells)."""
SHARED_FRAME_CHARS = 64 * 1024
"""Events at least this large have their stream frame made once for all followers (the latest few kept)."""
FRAMES_KEPT = 4


def _chars(event: Event) -> int:
    """About how much memory an event holds: the length of its texts (a child run's event's too)."""
    texts = [*vars(event).values(), *(event.data.values() if isinstance(event, ChildEvent) else ())]
    return sum(len(value) for value in texts if isinstance(value, str))


def _image(event: Event) -> str | None:
    """The image of a figure event, the root's or a child run's; None for any other event."""
    if isinstance(event, FigureEvent):
        return event.data
    if isinstance(event, ChildEvent) and event.event == "figure" and isinstance(event.data.get("data"), str):
        return str(event.data["data"])
    return None


def _without_image(event: Event) -> Event:
    """A copy of a figure event (`_image`) without its image."""
    if isinstance(event, ChildEvent):
        return event.model_copy(update={"data": {**event.data, "data": ""}})
    return event.model_copy(update={"data": ""})


def _cut_answer(event: AnswerEvent) -> AnswerEvent:
    cut = len(event.content) - SUPERSEDED_ANSWER_CHARS
    note = f"\n\n… [{cut:,} more characters of this earlier answer are not kept; a later answer replaced it]"
    return event.model_copy(update={"content": event.content[:SUPERSEDED_ANSWER_CHARS] + note})


class LiveRun:
    """One run on this server: its events so far and its driver task."""

    def __init__(self, run_id: str, *, detached: bool = False, session_id: str | None = None) -> None:
        self.id = run_id
        self.detached = detached
        self.session_id = session_id
        self.events: list[Event] = []
        self.chars = 0
        """About how much its events hold in memory (`_chars`)."""
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.ended_at: float | None = None
        self._changed = asyncio.Event()
        self._on_end: list[Callable[[LiveRun], None]] = []
        self._last_answer: int | None = None
        self._figures: list[int] = []
        """Where the figures still kept with their image are in `events`, oldest first."""
        self._figure_chars = 0
        self._frames: OrderedDict[int, bytes] = OrderedDict()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def emit(self, event: Event) -> None:
        """Append the run's next event (numbering it) and wake its followers."""
        if self.ended:
            raise RuntimeError(f"run {self.id} already ended; {event.type} cannot follow its terminal event")
        event.seq = len(self.events) + 1
        if isinstance(event, AnswerEvent):
            self._supersede_answer()
            self._last_answer = len(self.events)
        self.events.append(event)
        self.chars += _chars(event)
        if (image := _image(event)) is not None:
            self._keep_figure(image)
        terminal = is_terminal(event)
        if terminal:
            self.ended_at = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if terminal:
            callbacks, self._on_end = self._on_end, []
            for callback in callbacks:
                callback(self)

    def _supersede_answer(self) -> None:
        """Cut the previous answer, now replaced, in the list (a copy: what was recorded or sent stays whole)."""
        if self._last_answer is None:
            return
        previous = self.events[self._last_answer]
        if isinstance(previous, AnswerEvent) and len(previous.content) > SUPERSEDED_ANSWER_CHARS:
            cut = _cut_answer(previous)
            self.events[self._last_answer] = cut
            self.chars += _chars(cut) - _chars(previous)
            self._frames.pop(previous.seq, None)

    def _keep_figure(self, image: str) -> None:
        """Count the figure just added (its `image`), and drop the images of the oldest figures (in copies: what
        was recorded or sent stays whole) while the run keeps more than LIVE_FIGURE_CHARS of them, the newest
        always whole. A child run's figures count with the root's."""
        self._figures.append(len(self.events) - 1)
        self._figure_chars += len(image)
        while self._figure_chars > LIVE_FIGURE_CHARS and len(self._figures) > 1:
            oldest = self._figures.pop(0)
            figure = self.events[oldest]
            size = len(_image(figure) or "")
            self.events[oldest] = _without_image(figure)
            self._figure_chars -= size
            self.chars -= size
            self._frames.pop(figure.seq, None)

    def frame(self, event: EventBase, encode: Callable[[EventBase], bytes]) -> bytes:
        """`encode(event)`, the event's stream frame; for a large one, made once and shared by its followers."""
        made = self._frames.get(event.seq)
        if made is not None and self.events[event.seq - 1] is event:
            return made
        made = encode(event)
        if len(made) >= SHARED_FRAME_CHARS and self.events[event.seq - 1] is event:
            self._frames[event.seq] = made
            while len(self._frames) > FRAMES_KEPT:
                self._frames.popitem(last=False)
        return made

    def on_end(self, callback: Callable[[LiveRun], None]) -> None:
        """Call `callback(run)` once the run has emitted its terminal event (at once if it has)."""
        if self.ended:
            callback(self)
        else:
            self._on_end.append(callback)

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        """The run's events numbered above `after`, then each new one as it comes, up to the terminal one."""
        index = max(after, 0)
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                yield event
            if self.ended:
                return
            await self._changed.wait()

    def cancel(self, reason: str) -> bool:
        """Stop the run; it ends with an `error` event, code `cancelled`. False if it had already ended."""
        if self.ended or self.task is None:
            return False
        if self.cancel_reason is not None:
            # Asked already (a second press of stop, a cancel meeting the client's disconnect): the run is ending,
            # and cancelling its task again would interrupt its clean-up (the worker, the files with its input).
            return True
        self.cancel_reason = reason
        coro = self.task.get_coro()
        if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            # Not begun (launched in this turn of the loop): a task cancelled before its first step never runs its
            # coroutine, so the driver would neither clean up nor end the run. Its first step is scheduled already,
            # and callbacks run in the order they were scheduled: the cancel comes right after it.
            asyncio.get_running_loop().call_soon(self.task.cancel)
        else:
            self.task.cancel()
        return True

    async def wait(self) -> None:
        """Until the driver task is done (its clean-up included)."""
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


class RunRegistry:
    """The runs of this server process, live and recently ended, by id."""

    def __init__(self) -> None:
        self._live: dict[str, LiveRun] = {}
        self._ended: OrderedDict[str, LiveRun] = OrderedDict()

    def add(self, run: LiveRun) -> None:
        self._live[run.id] = run
        run.on_end(self._ended_run)

    def _ended_run(self, run: LiveRun) -> None:
        self._live.pop(run.id, None)
        self._ended[run.id] = run
        self._prune()

    def _prune(self) -> None:
        now = time.monotonic()
        held = sum(run.chars for run in self._ended.values())
        while self._ended:
            oldest = next(iter(self._ended.values()))
            recent = now - (oldest.ended_at or now) < ENDED_KEPT_S
            if len(self._ended) <= ENDED_KEPT_MAX and held <= ENDED_KEPT_CHARS and recent:
                break
            self._ended.popitem(last=False)
            held -= oldest.chars

    def get(self, run_id: str) -> LiveRun | None:
        self._prune()
        return self._live.get(run_id) or self._ended.get(run_id)

    def live(self) -> list[LiveRun]:
        return list(self._live.values())

    def forget(self, run_id: str) -> None:
        """Drop an ended run's events from memory (it was deleted from history)."""
        self._ended.pop(run_id, None)
