"""Reading `POST /process` bodies: JSON, or multipart with a file streamed to disk as it arrives.

Everything here refuses early, with an `HTTPException` whose message says what to change: a body past
its limit stops being read at that point, and a body that stalls or trickles times out (a slow client
cannot hold the server's attention for long). JSON is parsed off the event loop, so a large body never
stalls other requests, and a body of more than `jsonbody.MAX_VALUES` values is refused before any parse,
so what the server builds from a body stays small whatever its shape.
"""

from __future__ import annotations

import asyncio
import json
import marshal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from . import jsonbody
from .answers import ChecksBusy, in_read_thread
from .config import Settings
from .engine import SCHEMA_MAX_CHARS, RunSettings
from .inputs import InputSpooler, InputTooLarge, RunInput
from .repl.workspace import instance_directory

MAX_FIELD_BYTES = jsonbody.MAX_FIELD_BYTES
FORM_OVERHEAD_BYTES = 4 * 1024 * 1024


class ProcessRequest(BaseModel):
    """The JSON body of `POST /process`."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What to do with the input.")
    input_data: StrictStr = Field("", description="The input, as text (use multipart for large files).")
    settings: RunSettings = Field(
        default_factory=RunSettings, description="Per-run limits, each at most the server's own."
    )
    session_id: StrictStr | None = Field(
        None, description="A follow-up question on this session's REPL (send no input: the session keeps its own)."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def describe_validation_error(exc: ValidationError, within: tuple[str | int, ...] = ()) -> str:
    """The first errors of `exc`, each as `where: what`; `within` is where the validated value sits."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(item) for item in (*within, *error["loc"])) or "body"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


@dataclass
class ParsedRequest:
    prompt: str
    run_input: RunInput
    settings: RunSettings
    session_id: str | None = None


@dataclass
class BodyLimits:
    """What a `POST /process` body may be: sizes, and how fast it must arrive."""

    input_bytes: int
    json_bytes: int
    prompt_chars: int
    idle_timeout: float
    min_rate: int
    """Bytes per second the body must average once `idle_timeout` has passed since it started."""
    json_cap_name: str = "RLM_MAX_JSON_BYTES"
    """What `json_bytes` is called in a refusal."""
    larger: str = "send large inputs as a multipart/form-data upload (field input_file)"
    """What a refusal of a JSON body too large says to do instead."""

    @classmethod
    def of(cls, settings: Settings) -> BodyLimits:
        return cls(
            input_bytes=settings.rlm_max_input_bytes,
            json_bytes=settings.rlm_max_json_bytes,
            prompt_chars=settings.rlm_max_prompt_chars,
            idle_timeout=settings.rlm_body_timeout_s,
            min_rate=settings.rlm_body_min_rate,
        )


async def body_chunks(stream: AsyncIterator[bytes], limits: BodyLimits) -> AsyncIterator[bytes]:
    """The body's chunks; 408 once it stalls for `idle_timeout`, or falls behind `min_rate` after it."""
    iterator = stream.__aiter__()
    started = time.monotonic()
    received = 0
    while True:
        deadline = started + limits.idle_timeout + received / limits.min_rate
        wait = min(limits.idle_timeout, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):  # (not `wait_for`, which in 3.11 can swallow a cancellation)
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except ClientDisconnect:
            # No one to answer, but a refusal ends the request as every other one does (cleaned up, one access log
            # line); uncaught, uvicorn logged it as an error of the application, with 50 lines of traceback.
            raise HTTPException(
                400, f"the client closed the connection before the request body was complete ({received:,} bytes)"
            ) from None
        except TimeoutError:
            raise HTTPException(
                408,
                f"the request body stalled or arrived too slowly ({received:,} bytes in "
                f"{time.monotonic() - started:.0f} s); send it at once",
            ) from None
        received += len(chunk)
        if chunk:
            yield chunk


def _validate(data: object, limits: BodyLimits) -> ProcessRequest:
    try:
        request = ProcessRequest.model_validate(data, context={SCHEMA_MAX_CHARS: limits.prompt_chars})
    except ValidationError as exc:
        raise HTTPException(422, describe_validation_error(exc)) from None
    except ChecksBusy as exc:
        raise HTTPException(429, f"settings.answer_schema: {exc}", headers={"Retry-After": "5"}) from None
    if len(request.prompt) > limits.prompt_chars:
        raise HTTPException(
            422,
            f"prompt: {len(request.prompt):,} characters, more than RLM_MAX_PROMPT_CHARS "
            f"({limits.prompt_chars:,}): the root model reads the prompt every turn, so send "
            "long text as the input (input_data, or the input_file upload) and ask about it",
        )
    return request


def _checked(data: object, limits: BodyLimits) -> ProcessRequest:
    if not isinstance(data, dict):
        raise HTTPException(400, 'the JSON body must be an object like {"prompt": "..."}')
    return _validate(data, limits)


def _form_request(fields: dict[str, str], limits: BodyLimits) -> ProcessRequest:
    """The request a form's text fields make (in a worker thread: its settings may hold a schema to check)."""
    try:
        settings = json.loads(fields["settings"]) if fields.get("settings", "").strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
        raise HTTPException(422, 'settings: must be a JSON object, e.g. {"max_iterations": 5}') from None
    data = {"settings": settings} | {name: fields[name] for name in ("prompt", "session_id") if name in fields}
    return _validate(data, limits)


def _loads(body: bytes) -> Any:
    """A small JSON body's document (in a worker thread), refused like the parser process refuses it."""
    if jsonbody.too_many_values(body):
        raise HTTPException(413, jsonbody.TOO_MANY_VALUES)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(400, "the body is not valid JSON: it is nested too deeply") from None


def _parse_inline(body: bytes, limits: BodyLimits) -> ParsedRequest:
    """Parse and check a small JSON body (in a worker thread)."""
    request = _checked(_loads(body), limits)
    run_input = RunInput.from_text(request.input_data)
    if run_input.size_bytes > limits.input_bytes:
        raise HTTPException(413, f"input_data is larger than RLM_MAX_INPUT_BYTES ({limits.input_bytes:,} bytes)")
    return ParsedRequest(request.prompt, run_input, request.settings, request.session_id)


def json_too_large(limits: BodyLimits, size: int | None = None) -> HTTPException | None:
    """The refusal of a JSON body of `size` bytes (None: it passed the cap), naming the limit it broke."""
    if limits.json_bytes <= limits.input_bytes + MAX_FIELD_BYTES:
        cap, name = limits.json_bytes, limits.json_cap_name
    else:
        cap, name = limits.input_bytes + MAX_FIELD_BYTES, "RLM_MAX_INPUT_BYTES"
    if size is not None and size <= cap:
        return None
    shown = f" ({size:,} bytes)" if size is not None else ""
    return HTTPException(
        413,
        f"the JSON body{shown} is larger than {name} allows ({cap:,} bytes); {limits.larger}",
    )


async def _head(stream: AsyncIterator[bytes], limits: BodyLimits) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """A small body whole (and None); or a large one's first part, just past `jsonbody.INLINE_BYTES`, and the
    chunks still to come, for a parser process to take as they arrive. Past the cap, 413."""
    body = bytearray()
    chunks = body_chunks(stream, limits)
    async for chunk in chunks:
        body += chunk
        if (refusal := json_too_large(limits, len(body))) is not None:
            raise refusal
        if len(body) > jsonbody.INLINE_BYTES:
            return bytes(body), chunks
    return bytes(body), None


async def read_json(stream: AsyncIterator[bytes], limits: BodyLimits) -> ParsedRequest:
    """Read a JSON body; a large one goes, as it arrives, to a parser process (`jsonbody`)."""
    head, rest = await _head(stream, limits)
    if rest is not None:
        return await _parse_in_child(head, rest, limits)
    return await in_read_thread(_parse_inline, head, limits)  # (checking a schema waits for a process)


async def _child_parser(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        jsonbody.__file__,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
    )


PARSER_STOPPED = "the server's JSON parser process stopped before it had read the body; send the request again"


async def _send(child: asyncio.subprocess.Process, data: bytes | bytearray) -> None:
    """Write part of the body to the parser child; a child that has stopped (killed, out of memory) is the
    server's failure, and the client is told so instead of getting a bare 500."""
    assert child.stdin is not None
    try:
        child.stdin.write(data)
        await child.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        raise HTTPException(503, PARSER_STOPPED) from None


async def _answer(child: asyncio.subprocess.Process) -> bytes:
    """The child's answer once the whole body is in; 503 if it stopped without giving one."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    answer = await child.stdout.read()
    await child.wait()
    if not answer:
        raise HTTPException(503, PARSER_STOPPED)
    return answer


async def _feed(
    child: asyncio.subprocess.Process,
    head: bytes,
    rest: AsyncIterator[bytes],
    limits: BodyLimits,
    keep: bytearray | None = None,
) -> bytes:
    """Stream the body into the child as it arrives (refusing it past the cap; adding it to `keep`, if given);
    the child's answer. The child is killed if this fails."""
    received = len(head)
    try:
        await _send(child, head)
        async for chunk in rest:
            received += len(chunk)
            if (refusal := json_too_large(limits, received)) is not None:
                raise refusal
            await _send(child, chunk)
            if keep is not None:
                keep += chunk
        return await _answer(child)
    except BaseException:
        await _end(child)
        raise


def _refused(answer: dict[str, Any]) -> None:
    """Raise the refusal a parser process answered with, if it did."""
    if answer.get("status") != 200:
        raise HTTPException(answer.get("status", 500), answer.get("detail", "the JSON body could not be read"))


async def _end(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.kill()
        await child.wait()


async def _parse_in_child(head: bytes, rest: AsyncIterator[bytes], limits: BodyLimits) -> ParsedRequest:
    child = await _child_parser(str(instance_directory()), str(limits.prompt_chars), str(limits.input_bytes))
    run_input: RunInput | None = None
    try:
        answer = json.loads(await _feed(child, head, rest, limits))
        _refused(answer)
        described = answer["input"]
        if described is not None:
            run_input = RunInput(
                chars=described["chars"],
                lines=described["lines"],
                size_bytes=described["size_bytes"],
                head=described["head"],
                path=Path(described["path"]),
                sha256=described["sha256"],
            )
        request = await in_read_thread(_checked, answer["fields"], limits)
        return ParsedRequest(request.prompt, run_input or RunInput.from_text(""), request.settings, request.session_id)
    except BaseException:
        if run_input is not None:
            run_input.discard()
        await _end(child)
        raise


async def read_json_object(stream: AsyncIterator[bytes], limits: BodyLimits) -> Any:
    """A JSON body as Python objects, parsed where it cannot stall the event loop: in a thread when it is
    small, in a child process (`jsonbody --object`) when it is large. Raises `HTTPException` (400, 408,
    413) like the rest of this module."""
    head, rest = await _head(stream, limits)
    if rest is None:
        return await asyncio.to_thread(_loads, head)
    answer = await _feed(await _child_parser("--object"), head, rest, limits)
    if answer[:1] != jsonbody.OBJECT:
        _refused(json.loads(answer[1:]))
    return await asyncio.to_thread(marshal.loads, answer[1:])


async def read_json_bytes(stream: AsyncIterator[bytes], limits: BodyLimits) -> bytes:
    """A JSON body's bytes, for a parser of its own to read (the MCP SDK's), once it is known to hold at most
    `jsonbody.MAX_VALUES` values: counted in a child process (`jsonbody --check`) when the body is large, in
    a thread when it is small. Whether it is valid JSON is for that parser to say. Raises `HTTPException`
    (408, 413) like the rest of this module."""
    head, rest = await _head(stream, limits)
    if rest is None:
        if await asyncio.to_thread(jsonbody.too_many_values, head):
            raise HTTPException(413, jsonbody.TOO_MANY_VALUES)
        return head
    body = bytearray(head)
    _refused(json.loads(await _feed(await _child_parser("--check"), head, rest, limits, keep=body)))
    return bytes(body)


FORM_FIELDS = ("prompt", "settings", "session_id")
"""The form fields read into memory (each up to MAX_FIELD_BYTES); `input_data` and `input_file` go to disk, and
the data of any other field is not kept (a body of a thousand fields of a megabyte each held a gigabyte)."""
ONCE_FIELDS = (*FORM_FIELDS, "input_data")
"""The text fields the service reads, each of which a form gives at most once: a second part of one is refused
(two `prompt` parts were one prompt, their texts joined). A second file, under either name, is refused as a
second input file (422), as it was before."""


class _FormReader:
    """Callbacks for python-multipart: the small fields in memory, `input_file` and `input_data` each to an
    `InputSpooler`."""

    def __init__(self, limit: int, spool_dir: str | None) -> None:
        self.limit = limit
        self.spool_dir = spool_dir
        self.fields: dict[str, bytearray] = {}
        self.spooler: InputSpooler | None = None
        self.text: InputSpooler | None = None
        """`input_data` sent as a form field (the input when no file is sent)."""
        self.files = 0
        self._given: set[str] = set()
        """The fields of `ONCE_FIELDS` given so far."""
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._target: InputSpooler | bytearray | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._target = None

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._name = name
        if name in ONCE_FIELDS:
            if name in self._given:
                raise HTTPException(400, f"the form field {name!r} is given twice; send each field once")
            self._given.add(name)
        # a part with a file name is the input file, unless it is one of the text fields (which some form clients
        # send as file parts too)
        if name in ("input_file", "file") or (filename is not None and name not in FORM_FIELDS):
            self.files += 1
            if self.files > 1:
                raise HTTPException(422, "send one input file per request (field input_file)")
            display = filename.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1] if filename else None
            self.spooler = InputSpooler(self.limit, directory=self.spool_dir, name=display)
            self._target = self.spooler
        elif name == "input_data":
            if self.text is None:
                self.text = InputSpooler(self.limit, directory=self.spool_dir)
            self._target = self.text
        elif name in FORM_FIELDS:
            self._target = self.fields.setdefault(name, bytearray())
        else:
            self._target = None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        target = self._target
        if isinstance(target, InputSpooler):
            target.feed(data[start:end])
        elif target is not None:
            target.extend(data[start:end])
            if len(target) > MAX_FIELD_BYTES:
                raise HTTPException(413, f"the form field {self._name!r} is too large")

    def input(self) -> RunInput:
        """The run's input: the file if one was sent, else the `input_data` field, else none. An empty file
        beside an `input_data` field is a form's file input left empty (a browser sends it, `filename=""`,
        with no content), so the field is the input: the empty file replaced it, and the run got no input."""
        if self.spooler is not None and self.text is not None and self.spooler.received == 0:
            self.spooler.abort()
            self.spooler = None
        if self.spooler is not None:
            if self.text is not None:
                self.text.abort()
            return self.spooler.finish()
        return self.text.finish() if self.text is not None else RunInput.from_text("")

    def abort(self) -> None:
        for spooler in (self.spooler, self.text):
            if spooler is not None:
                spooler.abort()


async def read_multipart(
    stream: AsyncIterator[bytes], content_type: str, limits: BodyLimits, spool_dir: str | None = None
) -> ParsedRequest:
    _, options = parse_options_header(content_type.encode("latin-1", "replace"))
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart body has no boundary in its Content-Type header")
    reader = _FormReader(limits.input_bytes, spool_dir)
    try:
        parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    except FormParserError as exc:  # a boundary longer than the RFC's 70 characters, past python-multipart's 256
        raise HTTPException(400, f"the multipart boundary in the Content-Type header is refused: {exc}") from None
    try:
        async for chunk in body_chunks(stream, limits):
            parser.write(chunk)
        parser.finalize()
        fields = {name: value.decode("utf-8", "replace") for name, value in reader.fields.items()}
        request = await in_read_thread(_form_request, fields, limits)
        return ParsedRequest(request.prompt, reader.input(), request.settings, request.session_id)
    except BaseException as exc:
        reader.abort()
        if isinstance(exc, InputTooLarge):
            raise HTTPException(413, f"{exc}; raise RLM_MAX_INPUT_BYTES on the server to allow it") from None
        if isinstance(exc, HTTPException) or not isinstance(exc, Exception):
            raise
        # python-multipart raises assorted errors on garbage
        raise HTTPException(400, f"the multipart body could not be parsed: {exc}") from None
