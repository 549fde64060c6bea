"""Runs generated code cells in one persistent namespace, as a notebook kernel would.

Standard library only: the REPL worker imports this module. The same class serves the `subprocess`
worker and the `inprocess` REPL; what differs is who provides `llm_batch` underneath.
"""

from __future__ import annotations

import ast
import base64
import builtins
import io
import json
import linecache
import reprlib
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .capture import BoundedText, StreamRouter, activate, deactivate, install_router

R = TypeVar("R")
BatchFn = Callable[[list[str]], list[str]]
RlmFn = Callable[[list[str], list[str | None]], list[str]]
"""Runs child RLMs: prompts and their contexts (None: no context of their own) in, final answers out."""

PROTECTED = ("context", "input_data", "llm_query", "llm_batch", "rlm_query", "rlm_batch")
MAX_FIGURES = 8
MAX_FIGURE_BYTES = 2 * 1024 * 1024
MAX_ANSWER_CHARS = 4 * 1024 * 1024
"""The most of `answer['content']` a run reports (and history keeps): every event that carries the answer is
serialized on the server's event loop, so its size is what one run can make every other request wait."""

# With the Agg backend plt.show() draws nothing; figures are collected after each cell instead.
warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")


@dataclass
class CellOutcome:
    """What one cell did: the text the root model sees, the error, and the answer afterwards. Made where the
    cell runs; a worker REPL rebuilds it from the worker's message, trusting none of its types or sizes."""

    stdout: str
    error: str | None
    truncated: bool
    answer_content: str
    answer_ready: bool
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    """PNG images (base64) of the matplotlib figures the cell left open."""
    duration_ms: int = 0
    restarted: bool = False
    """The REPL was restarted during this cell: every variable but the provided ones is gone."""


def _make_llm_functions(batch: BatchFn) -> tuple[Callable[[str], str], Callable[[Iterable[str]], list[str]]]:
    def llm_batch(prompts: Iterable[str]) -> list[str]:
        """Ask the sub-model every prompt in parallel; results come back in the same order.

        A call that failed after retries yields a string starting with "Error:"; the others are kept.
        """
        if isinstance(prompts, (str, bytes)):
            raise TypeError("llm_batch() takes a list of prompts; for one prompt use llm_query()")
        items = list(prompts)
        for index, prompt in enumerate(items):
            if not isinstance(prompt, str):
                raise TypeError(f"llm_batch(): prompt {index} is {type(prompt).__name__}, not str")
        if not items:
            return []
        return batch(items)

    def llm_query(prompt: str) -> str:
        """Ask the sub-model one prompt and return its reply (a string starting with "Error:" on failure)."""
        if not isinstance(prompt, str):
            raise TypeError(f"llm_query() takes a str, not {type(prompt).__name__}")
        return batch([prompt])[0]

    return llm_query, llm_batch


def _make_rlm_functions(rlm: RlmFn) -> tuple[Callable[..., str], Callable[..., list[str]]]:
    def rlm_batch(prompts: Iterable[str], contexts: Iterable[str | None] | None = None) -> list[str]:
        """Run a child RLM per prompt, in parallel: each gets its own REPL with its context as `context`
        and returns its final answer. Worth it when a sub-task itself needs code over a large piece;
        for a question a model can answer by reading, llm_batch is cheaper."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("rlm_batch() takes a list of prompts; for one prompt use rlm_query()")
        items = list(prompts)
        pieces: list[str | None] = [None] * len(items) if contexts is None else list(contexts)
        if isinstance(contexts, (str, bytes)) or len(pieces) != len(items):
            raise TypeError("rlm_batch(): contexts must be a list with one context (or None) per prompt")
        for index, (prompt, piece) in enumerate(zip(items, pieces, strict=True)):
            if not isinstance(prompt, str) or not (piece is None or isinstance(piece, str)):
                raise TypeError(f"rlm_batch(): prompt {index} must be a str and its context a str or None")
        return rlm(items, pieces) if items else []

    def rlm_query(prompt: str, context: str | None = None) -> str:
        """Run one child RLM on `prompt` (with `context` as its input) and return its final answer."""
        return rlm_batch([prompt], [context])[0]

    return rlm_query, rlm_batch


MAX_VARIABLES_SHOWN = 40
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxtuple = 5
_SHORT.maxlevel = 2


def describe_variable(name: str, value: Any) -> str:
    """`name: type, size = short repr`, without letting a hostile `__len__` or `__repr__` break the listing."""
    kind = type(value).__name__
    if isinstance(value, types.ModuleType):
        return f"{name}: module {value.__name__}"
    if callable(value) and isinstance(value, (types.FunctionType, type)):
        return f"{name}: {'class' if isinstance(value, type) else 'function'}"
    try:
        size = f", {len(value):,} items" if not isinstance(value, str) else f", {len(value):,} characters"
    except Exception:
        size = ""
    try:
        shown = _SHORT.repr(value)
    except Exception as exc:
        shown = f"<repr failed: {type(exc).__name__}>"
    return f"{name}: {kind}{size} = {shown[:100]}"


def _format_error(exc: BaseException, filename_prefix: str = "<cell") -> str:
    """A traceback that shows only the generated code's frames, then the exception itself."""
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename.startswith(filename_prefix)]
    text = "".join(traceback.format_exception_only(type(exc), exc))
    if frames:
        text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + text
    return text


class CellRunner:
    """One run's namespace and the cells executed in it."""

    def __init__(
        self,
        context: str,
        batch: BatchFn,
        *,
        rlm: RlmFn | None = None,
        max_output_chars: int = 8192,
        capture_all_threads: bool = False,
        answer: str = "",
        memory_limit_mb: int | None = None,
    ) -> None:
        """`rlm` runs child RLMs (by default they are plain sub-calls, the prompt and context joined);
        `capture_all_threads` also captures output of threads the code starts (one run per process);
        `memory_limit_mb`, the limit the process runs under, is named when a cell runs out of memory."""
        llm_query, llm_batch = _make_llm_functions(batch)
        rlm_query, rlm_batch = _make_rlm_functions(rlm or as_sub_calls(batch))
        self.max_output_chars = max_output_chars
        self.capture_all_threads = capture_all_threads
        self.memory_limit_mb = memory_limit_mb
        self._protected: dict[str, Any] = {
            "context": context,
            "input_data": context,
            "llm_query": llm_query,
            "llm_batch": llm_batch,
            "rlm_query": rlm_query,
            "rlm_batch": rlm_batch,
        }
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.namespace.update(self._protected)
        self.namespace["answer"] = {"content": answer, "ready": False}
        self._answer = (answer, False)
        self.cells = 0
        install_router()

    @property
    def answer(self) -> tuple[str, bool]:
        return self._answer

    def begin_run(self) -> list[str]:
        """A new run of a session begins: `answer` starts empty; returns one line per variable the earlier
        runs left (`name: type, size = short repr`), at most `MAX_VARIABLES_SHOWN`."""
        self.namespace["answer"] = {"content": "", "ready": False}
        self._answer = ("", False)
        lines: list[str] = []
        for name, value in list(self.namespace.items()):
            if name.startswith("_") or name in self._protected or name in ("answer", "__builtins__"):
                continue
            if len(lines) == MAX_VARIABLES_SHOWN:
                lines.append(f"… and {len(self.namespace) - len(lines)} more names")
                break
            lines.append(describe_variable(name, value))
        return lines

    def run(self, code: str) -> CellOutcome:
        """Execute one cell; never raises for errors in the code itself."""
        self.cells += 1
        filename = f"<cell {self.cells}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        sink = BoundedText(self.max_output_chars)
        token = activate(sink)
        if self.capture_all_threads:
            StreamRouter.fallback = sink
        error: str | None = None
        try:
            self._execute(code, filename, sink)
        except BaseException as exc:
            error = _format_error(exc)
            if isinstance(exc, MemoryError) and self.memory_limit_mb:
                error += (
                    f"The cell went past this REPL's memory limit of {self.memory_limit_mb:,} MB "
                    "(RLM_WORKER_MEMORY_MB); its variables are kept. Work on the input in pieces, or free "
                    "large variables with del.\n"
                )
        finally:
            deactivate(token)
            StreamRouter.fallback = None
        notes = self._restore_protected() + self._normalize_answer()
        figures, figure_notes = collect_figures()
        content, ready = self._answer
        return CellOutcome(
            stdout=sink.getvalue(),
            error=error,
            truncated=sink.truncated,
            answer_content=content,
            answer_ready=ready,
            notes=notes + figure_notes,
            figures=figures,
        )

    def _execute(self, code: str, filename: str, sink: BoundedText) -> None:
        tree = ast.parse(code, filename, "exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body.pop().value  # type: ignore[attr-defined]
        if tree.body:
            exec(compile(tree, filename, "exec"), self.namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last), filename, "eval"), self.namespace)
            if value is not None:
                self.namespace["_"] = value
                text = repr(value)
                if sink.total and not _ends_with_newline(sink):
                    sink.write("\n")
                sink.write(text)

    def _restore_protected(self) -> list[str]:
        notes = []
        for name, value in self._protected.items():
            if self.namespace.get(name) is not value:
                self.namespace[name] = value
                notes.append(
                    f"`{name}` is provided by the REPL and was restored; store your own data under another name."
                )
        return notes

    def _normalize_answer(self) -> list[str]:
        value = self.namespace.get("answer")
        previous_content, _ = self._answer
        if isinstance(value, str):
            value = {"content": value, "ready": False}
            self.namespace["answer"] = value
            note = (
                "`answer` must be a dict; your string was put in answer['content'] with ready=False. "
                "Use answer['content'] = ... and answer['ready'] = True."
            )
            return [note, *self._normalize_answer()]
        # Only a plain dict is read: a subclass's methods are generated code, which may raise or never return.
        if type(value) is not dict:
            self.namespace["answer"] = {"content": previous_content, "ready": False}
            self._answer = (previous_content, False)
            return [
                f"`answer` must be a dict like {{'content': str, 'ready': bool}}, not "
                f"{type(value).__name__}; it was reset to its previous content."
            ]
        notes = []
        content = value.get("content", "")
        if isinstance(content, str):
            content = str.__str__(content)  # a plain str, whatever subclass of str it was
        elif type(content) in (dict, list) and (text := _json_text(content)) is not None:
            # JSON rather than Python's repr: what a typed answer needs, and what readers of the API can parse
            content = text
            notes.append("answer['content'] was converted to a str of JSON.")
        else:
            try:
                content = "" if content is None else str.__str__(str(content))
            except Exception as exc:
                content = previous_content
                notes.append(f"answer['content'] could not be converted to str ({type(exc).__name__}); it was reset.")
            else:
                notes.append("answer['content'] was converted to str.")
        ready = value.get("ready", False)
        if type(ready) is not bool:
            try:
                ready = bool(ready)
            except Exception as exc:
                ready = False
                notes.append(f"answer['ready'] could not be converted to bool ({type(exc).__name__}); it is False.")
            else:
                notes.append("answer['ready'] was converted to bool.")
        value["content"], value["ready"] = content, ready
        if len(content) > MAX_ANSWER_CHARS:
            notes.append(
                f"answer['content'] has {len(content):,} characters; only the first {MAX_ANSWER_CHARS:,} are "
                "reported. Make the answer shorter: summarize, or point to the part of the input that holds it."
            )
            content = content[:MAX_ANSWER_CHARS]
        self._answer = (content, ready)
        return notes


def _json_text(value: dict[Any, Any] | list[Any]) -> str | None:
    """`value` as JSON text, or None where JSON cannot hold it (keys or values of other types, NaN and infinities,
    cycles, nesting deeper than the interpreter's recursion limit) or where generated code it holds raises (the
    `items` of a dict subclass, which the encoder calls)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except Exception:
        return None


def as_sub_calls(batch: Callable[[list[str]], R]) -> Callable[[list[str], list[str | None]], R]:
    """Child RLMs where recursion is off: one sub-call each, the context appended to the prompt. `batch`
    may be sync or async: what it returns (the replies, or a coroutine of them) is handed back as it is."""
    return lambda prompts, contexts: batch([join_prompt(p, c) for p, c in zip(prompts, contexts, strict=True)])


def join_prompt(prompt: str, context: str | None) -> str:
    return prompt if not context else f"{prompt}\n\n---\n{context}"


def _ends_with_newline(sink: BoundedText) -> bool:
    value = sink.getvalue()
    return not value or value.endswith("\n")


def collect_figures() -> tuple[list[str], list[str]]:
    """Render and close the matplotlib figures left open, if the code used matplotlib at all."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return [], []
    numbers = pyplot.get_fignums()
    images, notes = [], []
    for number in numbers[:MAX_FIGURES]:
        buffer = io.BytesIO()
        try:
            pyplot.figure(number).savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        except Exception as exc:
            notes.append(f"figure {number} could not be rendered: {type(exc).__name__}: {exc}")
            continue
        if buffer.tell() > MAX_FIGURE_BYTES:
            notes.append(f"figure {number} is larger than {MAX_FIGURE_BYTES // 2**20} MB as a PNG; not shown")
            continue
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    if len(numbers) > MAX_FIGURES:
        notes.append(f"only the first {MAX_FIGURES} of {len(numbers)} figures are shown")
    pyplot.close("all")
    if images:
        notes.append(f"{len(images)} figure{'s' if len(images) > 1 else ''} shown to the user (closed now).")
    return images, notes
