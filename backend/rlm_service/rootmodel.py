"""The root model: PydanticAI's `OpenAIChatModel`, whose requests go out through our `ChatClient`.

PydanticAI maps the conversation to chat-completions parameters and reads the reply; the `openai`
SDK's own request path in between (its recursive "transform" of the parameters, httpx2, its response
parsing) was measured at about 3.5 ms of CPU per root request, a fifth of the server's CPU with 32
runs at once (BENCHMARKS.md, B7), and the transform alone at 0.25 ms per history message per turn
(B3). `DirectAsyncOpenAI` keeps the SDK's client for PydanticAI's sake but sends chat completions
through our `ChatClient` (llm.py), with the retries, `Retry-After` handling and whole-response
deadline of sub-calls. The same place sends `""` instead of `null` for the content of an assistant
message that only calls tools, which llama.cpp's server rejects.

`RootChatModel` leaves pricing to the service, as for sub-calls: a cost the endpoint reports (OpenRouter's
`usage.cost`) goes into the run's cost, and otherwise RLM_PRICES does.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import Any

import openai
from openai import NotGiven, Omit
from openai.resources.chat import AsyncChat
from openai.resources.chat.completions import AsyncCompletions
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.profiles.openai import OpenAIModelProfile
from pydantic_ai.providers.openai import OpenAIProvider

from .config import Settings
from .llm import ChatClient, first_choice, reported_cost

_REQUEST_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")


def _chat_completion(payload: Any) -> ChatCompletion:
    """The reply as the SDK's type. Validation is fast (about 10 µs); a compatible server's reply that does
    not fit the SDK's types exactly is taken field by field instead, as the SDK itself does (about 150 µs)."""
    first_choice(payload)  # a reply without choices is retried like any garbled reply
    try:
        return ChatCompletion.model_validate(payload)
    except ValidationError:
        return ChatCompletion.construct(**payload)


class _DirectCompletions(AsyncCompletions):
    def __init__(self, client: DirectAsyncOpenAI) -> None:
        super().__init__(client)
        self.chat_client = client.chat_client

    async def create(self, **params: Any) -> Any:  # type: ignore[override]
        options = {name: params.pop(name) for name in _REQUEST_OPTIONS if name in params}
        if params.get("stream"):
            raise NotImplementedError("the controller does not stream root requests")
        body = {name: value for name, value in params.items() if not isinstance(value, (Omit, NotGiven))}
        if isinstance(options.get("extra_body"), dict):
            body.update(options["extra_body"])
        body["messages"] = [
            {**message, "content": ""} if message.get("role") == "assistant" and message.get("content") is None
            else message
            for message in body.get("messages", [])
        ]
        return await self.chat_client.post(body, _chat_completion)


class _DirectChat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _DirectCompletions(self._client)  # type: ignore[arg-type]


class DirectAsyncOpenAI(openai.AsyncOpenAI):
    """`openai.AsyncOpenAI` whose chat completions go out through a `ChatClient`, as PydanticAI made them."""

    def __init__(self, chat_client: ChatClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat_client = chat_client

    @cached_property
    def chat(self) -> AsyncChat:
        return _DirectChat(self)


REPORTED_COST = "reported_cost"
"""The key of `ModelResponse.provider_details` that holds the cost in USD the endpoint reported."""


class RootChatModel(OpenAIChatModel):
    """`OpenAIChatModel` priced by the service, not by PydanticAI.

    A reply's reported cost is kept under `provider_details[REPORTED_COST]` (the controller adds it to
    the run's cost) and as its `usage.cost`. Without one, `usage.cost` is zero rather than unset: unset,
    PydanticAI would look the model up in its price tables after every reply (genai-prices: 0.1–0.3 ms
    of CPU each, B7) for an estimate the service does not use.
    """

    def _process_response(self, response: ChatCompletion | str, **kwargs: Any) -> ModelResponse:
        result = super()._process_response(response, **kwargs)
        usage = getattr(response, "usage", None)
        reported = reported_cost(usage.model_extra) if usage is not None else None
        if reported is not None:
            result.provider_details = {**(result.provider_details or {}), REPORTED_COST: reported}
            result.usage.cost = Decimal(str(reported))
        elif result.usage.cost is None:
            result.usage.cost = Decimal(0)
        return result


def build_root_model(settings: Settings, client: ChatClient, *, model_name: str | None = None) -> RootChatModel:
    """A root model on PydanticAI (the configured root model unless `model_name` is given; child runs of
    a recursive run use the sub model), talking to the configured OpenAI-compatible endpoint."""
    sdk = DirectAsyncOpenAI(client, base_url=settings.openai_api_base, api_key=settings.api_key_value(),
                            max_retries=0)
    profile = None
    if "api.openai.com" not in settings.openai_api_base:
        # Most compatible servers reject `strict` tool schemas and OpenAI-only parameters.
        profile = OpenAIModelProfile(openai_supports_strict_tool_definition=False,
                                     openai_chat_supports_max_completion_tokens=False)
    return RootChatModel(model_name or settings.openai_model_name or "",
                         provider=OpenAIProvider(openai_client=sdk), profile=profile)
