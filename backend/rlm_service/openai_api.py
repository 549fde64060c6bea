"""The OpenAI-compatible endpoint: `GET /v1/models` and `POST /v1/chat/completions` with `"model": "rlm"`.

Any OpenAI client can use the service as a model: the conversation is the run's input, the last user
message its task (`openai_chat` says how), and the reply's content is the run's final answer.
`finish_reason` is `stop` when the answer was marked ready, `length` when limits ended the run first (and when
the run has a note, why its answer cannot be trusted or why it has none, the message's `reasoning_content` says it);
`usage` adds up the root and the sub-model tokens. With `stream: true` the run's progress arrives as
`reasoning_content` deltas while it works, then the answer as `content` deltas, then `data: [DONE]`.
`response_format` `json_schema` (or `json_object`) becomes the run's answer schema. `temperature`,
`top_p`, `max_tokens` and `seed` apply to the root model; other parameters are ignored; `n` > 1 is refused.

Errors come in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, with the status codes
OpenAI uses; the API key clients send is RLM_API_TOKEN. Closing the connection cancels the run, whether
the reply streams or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answers import ChecksBusy, in_read_thread
from .auth import token_check
from .config import Settings
from .engine import SCHEMA_CHECKED, SCHEMA_MAX_CHARS, SHUTTING_DOWN, Engine, RunSettings
from .events import ErrorEvent, FinalEvent, RunUsage, SubcallsEvent
from .inputs import RunInput
from .openai_chat import (
    MODEL_ID,
    BadConversation,
    ChatMessage,
    ChatRequest,
    Progress,
    dumps,
    error_body,
    render,
    subcalls_text,
    task_of,
)
from .runs import LiveRun
from .streaming import SEP, RunSlots, sse_response, until_shutdown
from .uploads import BodyLimits, describe_validation_error, read_json_object

ANSWER_DELTA_CHARS = 1000
"""The answer goes out in `content` deltas of this many characters."""
MESSAGES_IN_ONE_CHECK = 1000
"""Longer conversations are validated message by message: pydantic holds the interpreter lock through one
validation, even in a thread, and tens of thousands of messages take a tenth of a second."""
SUBCALLS_EVERY_S = 1.0
"""Sub-call progress goes into the stream at most this often (and at the start and end of each cell)."""
_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}


class OpenAIError(Exception):
    """A refusal in OpenAI's shape: the status, and the body's type, code and param."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None, type_: str | None = None
    ) -> None:
        super().__init__(message)
        kind, default_code = _ERROR_KINDS.get(status, ("server_error", "server_error"))
        self.status, self.message = status, message
        self.type, self.code, self.param = type_ or kind, code or default_code, param

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.code, self.param), status_code=self.status, headers=headers
        )


class OpenAIRoute(APIRoute):
    """Routes whose every refusal (the token check's too) answers in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except HTTPException as exc:
                message = (
                    str(exc.detail)
                    if exc.status_code != 401
                    else ("wrong or missing API key: use the service's RLM_API_TOKEN as the API key")
                )
                return OpenAIError(exc.status_code, message).response(exc.headers)

        return route


SERVED = "GET /v1/models, GET /v1/models/{model} and POST /v1/chat/completions"


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def routing_refusal(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's refusal of a /v1 request (no such endpoint, or not with this method) in OpenAI's shape, which
    OpenAI clients read and show; FastAPI's `{"detail": …}` reaches their users as a bare status code."""
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        message = f"this service has no endpoint {method} {path}: it serves {SERVED}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{path} does not take {method}" + (f": use {allowed}" if allowed else "")
    else:
        message = str(exc.detail)
    return OpenAIError(exc.status_code, message).response(exc.headers)


def _completion_id(run: LiveRun) -> str:
    return f"chatcmpl-{run.id}"


def _usage(usage: RunUsage) -> dict[str, int]:
    prompt = usage.root.input_tokens + usage.sub.input_tokens
    completion = usage.root.output_tokens + usage.sub.output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _run_failed(event: ErrorEvent) -> OpenAIError:
    return OpenAIError(500, f"The run failed: {event.message}", code=event.code, type_="server_error")


def openai_router(settings: Settings, slots: RunSlots, *, ping_s: float) -> APIRouter:
    """`GET /v1/models`, `GET /v1/models/rlm`, `POST /v1/chat/completions`, behind RLM_API_TOKEN."""
    router = APIRouter(
        prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(token_check(settings))]
    )
    limits = BodyLimits.of(settings)
    created = int(time.time())
    model_card = {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "rlm-service"}

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        """The one model this service is: `rlm`."""
        return {"object": "list", "data": [model_card]}

    @router.get("/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        if model != MODEL_ID:
            raise OpenAIError(
                404,
                f"The model {model!r} does not exist; this service serves {MODEL_ID!r}.",
                code="model_not_found",
                param="model",
            )
        return model_card

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Run an RLM on the conversation; the reply is its final answer (streamed with `stream: true`)."""
        problem = settings.setup_problem()
        if problem:
            raise OpenAIError(503, problem, code="model_not_configured")
        slots.refuse_if_full()
        with slots.reading_body():
            chat = await _read_chat(request, limits)
        # in a thread: the conversation is rendered, encoded and hashed, and may be tens of megabytes
        run_settings, run_input, task = await in_read_thread(_prepare, chat, settings)  # (a schema's check)
        model_settings, stream = chat.model_settings(), chat.stream
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        del chat  # the conversation (up to RLM_MAX_JSON_BYTES) is in the run's input now: not held for the run's length
        slots.refuse_if_full()
        engine: Engine = request.app.state.engine
        run = slots.start(lambda: engine.launch(task, run_input, run_settings, model_settings=model_settings))
        if stream:
            shutdown = anyio.Event()  # the server stopping cancels the run: its error chunk, then [DONE]
            return sse_response(
                settings,
                until_shutdown(_chunks(run, include_usage), shutdown, lambda: run.cancel(SHUTTING_DOWN)),
                ping_s=ping_s,
                shutdown=shutdown,
            )
        return await _complete(request, run)

    return router


async def _read_chat(request: Request, limits: BodyLimits) -> ChatRequest:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(400, f"send the request as application/json (not {media_type or 'no content type'})")
    try:
        data = await read_json_object(request.stream(), limits)
    except HTTPException as exc:
        detail = str(exc.detail).replace(
            "a multipart/form-data upload (field input_file)", "a multipart upload to POST /process"
        )
        raise OpenAIError(exc.status_code, detail) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    chat = await asyncio.to_thread(_chat_request, data)
    if chat.model != MODEL_ID:
        raise OpenAIError(
            404,
            f"The model {chat.model!r} does not exist; this service serves {MODEL_ID!r}.",
            code="model_not_found",
            param="model",
        )
    if chat.n is not None and chat.n > 1:
        raise OpenAIError(
            400,
            f"n = {chat.n}: an RLM run gives one answer; ask for one choice (n = 1) and send "
            "more requests for more answers",
            code="unsupported_value",
            param="n",
        )
    if chat.stream_options is not None and not chat.stream:
        raise OpenAIError(
            400, "stream_options applies only to a stream: send it with stream: true", param="stream_options"
        )
    return chat


def _chat_request(data: dict[str, Any]) -> ChatRequest:
    """`data` validated (in a thread; a long conversation a message at a time, so that the event loop gets
    the interpreter lock in between); a refusal as an OpenAI error naming the first wrong field."""
    within: tuple[str | int, ...] = ()
    try:
        messages = data.get("messages")
        if isinstance(messages, list) and len(messages) > MESSAGES_IN_ONE_CHECK:
            checked = []
            for number, message in enumerate(messages):
                within = ("messages", number)
                checked.append(ChatMessage.model_validate(message))
            within = ()
            data = {**data, "messages": checked}
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = (*within, *exc.errors()[0]["loc"])
        raise OpenAIError(
            400, describe_validation_error(exc, within), param=".".join(map(str, first)) or None
        ) from None


def _prepare(chat: ChatRequest, settings: Settings) -> tuple[RunSettings, RunInput, str]:
    """The run's settings, input and task; refusals as OpenAI errors."""
    schema = chat.answer_schema()
    # `json_object` asks for our own `{"type": "object"}`: nothing to check (a check takes a process)
    json_object = chat.response_format is not None and chat.response_format.type == "json_object"
    try:
        context = {SCHEMA_MAX_CHARS: settings.rlm_max_prompt_chars, SCHEMA_CHECKED: json_object}
        run_settings = RunSettings.model_validate({"answer_schema": schema}, context=context)
    except ValidationError as exc:  # pydantic keeps the SchemaInvalid the schema's check raised
        first = exc.errors()[0]
        message = str(first.get("ctx", {}).get("error", first["msg"]))
        raise OpenAIError(422, f"response_format.json_schema.schema: {message}", param="response_format") from None
    except ChecksBusy as exc:
        raise HTTPException(429, f"response_format: {exc}", headers={"Retry-After": "5"}) from None
    try:
        text, last_user = render(chat.messages)
    except BadConversation as exc:
        raise OpenAIError(400, str(exc), param="messages") from None
    run_input = RunInput.from_text(text)
    if run_input.size_bytes > settings.rlm_max_input_bytes:
        raise OpenAIError(
            413,
            f"the messages are larger than RLM_MAX_INPUT_BYTES ({settings.rlm_max_input_bytes:,} bytes)",
            param="messages",
        )
    return run_settings, run_input, task_of(last_user, settings.rlm_max_prompt_chars)


async def _complete(request: Request, run: LiveRun) -> Response:
    """Wait for the run's end (cancelling it if the client leaves first), then answer with the completion."""
    left = asyncio.ensure_future(_disconnected(request))
    ended = asyncio.ensure_future(run.wait())
    try:
        await asyncio.wait([left, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not run.ended:
            run.cancel("the client disconnected")
        await run.wait()
    terminal = run.events[-1]
    if isinstance(terminal, ErrorEvent) and run.cancel_reason == SHUTTING_DOWN:
        # not the request's fault, and another try may reach another process or replica: OpenAI's clients
        # retry a 503 on their own
        error = OpenAIError(503, "The server is shutting down: send the request again.", code="server_shutting_down")
        return error.response({"Retry-After": "1"})
    if isinstance(terminal, ErrorEvent):
        # OpenAI's clients retry a 500 twice unless told not to: the whole task would run again, while the run
        # has retried its model calls already (RLM_MODEL_RETRIES)
        return _run_failed(terminal).response({"x-should-retry": "false"})
    assert isinstance(terminal, FinalEvent)
    return JSONResponse(
        {
            "id": _completion_id(run),
            "object": "chat.completion",
            "created": int(terminal.ts),
            "model": MODEL_ID,
            "choices": [
                {
                    "index": 0,
                    "message": _message(terminal),
                    "finish_reason": "stop" if terminal.ready else "length",
                    "logprobs": None,
                }
            ],
            "usage": _usage(terminal.usage),
        }
    )


def _message(terminal: FinalEvent) -> dict[str, Any]:
    """The reply's message: the answer, and the run's note (why its answer cannot be trusted, or why it has none:
    the root model wrote no code) as `reasoning_content`, where a stream sends the run's progress."""
    message: dict[str, Any] = {"role": "assistant", "content": terminal.answer, "refusal": None}
    if terminal.note:
        message["reasoning_content"] = f"Note: {terminal.note}"
    return message


async def _disconnected(request: Request) -> None:
    """Until the client disconnects (the body has been read, so the next ASGI message can only say that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chunks(run: LiveRun, include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    """The run as `chat.completion.chunk`s; closing the stream cancels the run."""
    base = {
        "id": _completion_id(run),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> ServerSentEvent:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return ServerSentEvent(data=dumps({**base, "choices": [choice]}), sep=SEP)

    progress = Progress()
    last_subcalls = 0.0
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in run.follow():
            if isinstance(event, SubcallsEvent):
                now = time.monotonic()
                if event.done in (0, 1, event.total) or now - last_subcalls >= SUBCALLS_EVERY_S:
                    last_subcalls = now
                    yield chunk({"reasoning_content": subcalls_text(event.done, event.failed, event.total)})
            elif isinstance(event, FinalEvent):
                if event.note:
                    yield chunk({"reasoning_content": f"\nNote: {event.note}\n"})
                for start in range(0, len(event.answer), ANSWER_DELTA_CHARS):
                    yield chunk({"content": event.answer[start : start + ANSWER_DELTA_CHARS]})
                    await asyncio.sleep(0)  # thousands of deltas go out at once: let the loop serve others between
                yield chunk({}, "stop" if event.ready else "length")
                if include_usage:
                    yield ServerSentEvent(data=dumps({**base, "choices": [], "usage": _usage(event.usage)}), sep=SEP)
            elif isinstance(event, ErrorEvent):
                failed = _run_failed(event)
                yield ServerSentEvent(data=dumps(error_body(failed.message, failed.type, failed.code)), sep=SEP)
            elif (text := progress.text(event)) is not None:
                yield chunk({"reasoning_content": text})
        yield ServerSentEvent(data="[DONE]", sep=SEP)
    finally:
        if not run.ended:
            run.cancel("the client disconnected")
