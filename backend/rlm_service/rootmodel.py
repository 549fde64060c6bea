"""The root model: PydanticAI's `OpenAIChatModel` on a lean `openai` client.

`DirectAsyncOpenAI` is the SDK's client with one change: chat completions skip the SDK's recursive
"transform" of the request parameters. PydanticAI already builds plain JSON-ready dicts, and that
transform walks every message of the history on every turn: measured at about 0.25 ms per message,
it was most of the controller's own cost per iteration (BENCHMARKS.md, B3). The same place also
sends `""` instead of `null` for the content of an assistant message that only calls tools, which
llama.cpp's server rejects.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import httpx2
import openai
from openai import AsyncStream, NotGiven, Omit
from openai._base_client import make_request_options
from openai.resources.chat import AsyncChat
from openai.resources.chat.completions import AsyncCompletions
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.profiles.openai import OpenAIModelProfile
from pydantic_ai.providers.openai import OpenAIProvider

from .config import Settings

_REQUEST_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")


class _DirectCompletions(AsyncCompletions):
    async def create(self, **params: Any) -> Any:  # type: ignore[override]
        options = {name: params.pop(name) for name in _REQUEST_OPTIONS if name in params}
        body = {name: value for name, value in params.items() if not isinstance(value, (Omit, NotGiven))}
        body["messages"] = [
            {**message, "content": ""} if message.get("role") == "assistant" and message.get("content") is None
            else message
            for message in body.get("messages", [])
        ]
        stream = bool(body.get("stream"))
        return await self._post(
            "/chat/completions", body=body, cast_to=ChatCompletion, stream=stream,
            stream_cls=AsyncStream[ChatCompletionChunk],
            options=make_request_options(**options, security={"bearer_auth": True}),
        )


class _DirectChat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _DirectCompletions(self._client)


class DirectAsyncOpenAI(openai.AsyncOpenAI):
    """`openai.AsyncOpenAI` whose chat completions send PydanticAI's parameters as they are."""

    @cached_property
    def chat(self) -> AsyncChat:
        return _DirectChat(self)


def build_root_model(settings: Settings, http: httpx2.AsyncClient, *, model_name: str | None = None
                     ) -> OpenAIChatModel:
    """A root model on PydanticAI (the configured root model unless `model_name` is given; child runs of
    a recursive run use the sub model), talking to the configured OpenAI-compatible endpoint."""
    client = DirectAsyncOpenAI(base_url=settings.openai_api_base, api_key=settings.api_key_value(),
                               http_client=http, max_retries=settings.rlm_model_retries,
                               timeout=settings.rlm_root_timeout_s)
    profile = None
    if "api.openai.com" not in settings.openai_api_base:
        # Most compatible servers reject `strict` tool schemas and OpenAI-only parameters.
        profile = OpenAIModelProfile(openai_supports_strict_tool_definition=False,
                                     openai_chat_supports_max_completion_tokens=False)
    return OpenAIChatModel(model_name or settings.openai_model_name or "",
                           provider=OpenAIProvider(openai_client=client), profile=profile)
