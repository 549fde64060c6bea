"""Reading `POST /process` bodies: JSON, or multipart with a file streamed to disk as it arrives.

Everything here refuses early: a body past its limit stops being read at that point, a stalled body
times out, and every refusal is a `RequestRefused` carrying the HTTP status and a message that says
what to change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from python_multipart.multipart import MultipartParser, parse_options_header

from .engine import RunSettings
from .inputs import InputSpooler, InputTooLarge, RunInput

MAX_FIELD_BYTES = 1024 * 1024
FORM_OVERHEAD_BYTES = 4 * 1024 * 1024


class RequestRefused(Exception):
    """A request turned down before any work: the service answers `{"detail": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.message = message


class ProcessRequest(BaseModel):
    """The JSON body of `POST /process`."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What to do with the input.")
    input_data: StrictStr = Field("", description="The input, as text (use multipart for large files).")
    settings: RunSettings = Field(default_factory=RunSettings, description="Per-run limits, each at most the "
                                  "server's own.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(item) for item in error["loc"]) or "body"
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


async def _chunks(stream: AsyncIterator[bytes], idle_timeout: float) -> AsyncIterator[bytes]:
    iterator = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), idle_timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestRefused(408, f"the request body stalled for {idle_timeout:g} s; send it at once") from None
        if chunk:
            yield chunk


def _validate(data: object) -> ProcessRequest:
    try:
        return ProcessRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestRefused(422, describe_validation_error(exc)) from None


async def read_json(stream: AsyncIterator[bytes], limit: int, idle_timeout: float) -> ParsedRequest:
    body = bytearray()
    async for chunk in _chunks(stream, idle_timeout):
        body += chunk
        if len(body) > limit + MAX_FIELD_BYTES:
            raise RequestRefused(413, f"the JSON body is larger than RLM_MAX_INPUT_BYTES ({limit:,} bytes); "
                                 "send large inputs as a multipart file upload (field input_file)")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestRefused(400, f"the body is not valid JSON: {exc}") from None
    del body
    if not isinstance(data, dict):
        raise RequestRefused(400, "the JSON body must be an object like {\"prompt\": \"...\"}")
    request = _validate(data)
    run_input = RunInput.from_text(request.input_data)
    if run_input.size_bytes > limit:
        raise RequestRefused(413, f"input_data is larger than RLM_MAX_INPUT_BYTES ({limit:,} bytes)")
    return ParsedRequest(request.prompt, run_input, request.settings)


class _FormReader:
    """Callbacks for python-multipart: small fields in memory, `input_file` to an `InputSpooler`."""

    def __init__(self, limit: int, spool_dir: str | None) -> None:
        self.limit = limit
        self.spool_dir = spool_dir
        self.fields: dict[str, bytearray] = {}
        self.spooler: InputSpooler | None = None
        self.files = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._target: InputSpooler | bytearray | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
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
        if name in ("input_file", "file") or (filename is not None and name not in ("prompt", "settings")):
            self.files += 1
            if self.files > 1:
                raise RequestRefused(422, "send one input file per request (field input_file)")
            display = filename.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1] if filename else None
            self.spooler = InputSpooler(self.limit, directory=self.spool_dir, name=display)
            self._target = self.spooler
        else:
            self._target = self.fields.setdefault(name, bytearray())

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        target = self._target
        if isinstance(target, InputSpooler):
            target.feed(data[start:end])
        elif target is not None:
            target.extend(data[start:end])
            cap = self.limit if self._name == "input_data" else MAX_FIELD_BYTES
            if len(target) > cap:
                raise RequestRefused(413, f"the form field {self._name!r} is too large")

    def abort(self) -> None:
        if self.spooler is not None:
            self.spooler.abort()


async def read_multipart(stream: AsyncIterator[bytes], content_type: str, limit: int, idle_timeout: float,
                         spool_dir: str | None = None) -> ParsedRequest:
    _, options = parse_options_header(content_type.encode("latin-1", "replace"))
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestRefused(400, "the multipart body has no boundary in its Content-Type header")
    reader = _FormReader(limit, spool_dir)
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in _chunks(stream, idle_timeout):
            parser.write(chunk)
        parser.finalize()
        fields = {name: value.decode("utf-8", "replace") for name, value in reader.fields.items()}
        try:
            settings = json.loads(fields["settings"]) if fields.get("settings", "").strip() else {}
        except ValueError:
            raise RequestRefused(422, "settings: must be a JSON object, e.g. {\"max_iterations\": 5}") from None
        data = {"settings": settings} | ({"prompt": fields["prompt"]} if "prompt" in fields else {})
        request = _validate(data)
        if reader.spooler is not None:
            run_input = reader.spooler.finish()
        else:
            run_input = RunInput.from_text(fields.get("input_data", ""))
        return ParsedRequest(request.prompt, run_input, request.settings)
    except BaseException as exc:
        reader.abort()
        if isinstance(exc, InputTooLarge):
            raise RequestRefused(413, f"{exc}; raise RLM_MAX_INPUT_BYTES on the server to allow it") from None
        if isinstance(exc, RequestRefused) or not isinstance(exc, Exception):
            raise
        # python-multipart raises assorted errors on garbage
        raise RequestRefused(400, f"the multipart body could not be parsed: {exc}") from None
