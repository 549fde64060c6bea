"""The root model: a PydanticAI `Model` that speaks chat completions through our `ChatClient`.

PydanticAI documents subclassing `Model` as the way to reach an API it has no adapter for; here it
gives the root model's requests the same client as sub-calls (one connection pool, the same retries,
`Retry-After` handling, whole-response deadline and key redaction) and keeps every request within what
OpenAI-compatible servers share: system, user, assistant and tool messages, and function tools. It
sends `""` rather than `null` as the content of an assistant message that only calls tools, which
llama.cpp's server rejects, and never sends `strict` tool schemas, which most compatible servers refuse.

A cost the endpoint reports (OpenRouter's `usage.cost`) goes into the response's usage and
`provider_details[REPORTED_COST]`, where the controller adds it to the run's cost; otherwise the usage's
cost is zero, and RLM_PRICES prices the run.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    SystemPromptPart,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RequestUsage

from .config import Settings
from .llm import ChatClient, content_text, first_choice, reported_cost, token_count

REPORTED_COST = "reported_cost"
"""The key of `ModelResponse.provider_details` that holds the cost in USD the endpoint reported."""

_FORWARDED_SETTINGS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop_sequences": "stop",
}
"""`ModelSettings` keys sent with a request, and their names in the chat-completions body."""


class UnsupportedMessage(ValueError):
    """A message part that chat completions cannot carry (the controller never makes one)."""


class ChatCompletionsModel(Model):
    """A model behind any OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self, client: ChatClient, model_name: str, *, base_url: str | None = None, settings: ModelSettings | None = None
    ) -> None:
        super().__init__(settings=settings)
        self.client = client
        self._model_name = model_name
        self._base_url = base_url

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def system(self) -> str:
        return "openai"

    @property
    def base_url(self) -> str | None:
        return self._base_url

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        settings, parameters = self.prepare_request(model_settings, model_request_parameters)
        body = self.request_body(self.prepare_messages(messages, parameters), settings, parameters)
        return await self.client.post(body, self._response)

    def request_body(
        self, messages: list[ModelMessage], settings: ModelSettings | None, parameters: ModelRequestParameters
    ) -> dict[str, Any]:
        """The chat-completions request for a prepared conversation."""
        wire: list[dict[str, Any]] = []
        instructions = "\n\n".join(part.content for part in parameters.instruction_parts or [] if part.content)
        if instructions:
            wire.append({"role": "system", "content": instructions})
        for message in messages:
            wire.extend(
                _request_messages(message) if isinstance(message, ModelRequest) else [_assistant_message(message)]
            )
        body: dict[str, Any] = {"model": self._model_name, "messages": wire}
        tools = [*parameters.function_tools, *parameters.output_tools]
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description or "",
                        "parameters": tool.parameters_json_schema,
                    },
                }
                for tool in tools
            ]
            if not parameters.allow_text_output:
                body["tool_choice"] = "required"
        for key, wire_key in _FORWARDED_SETTINGS.items():
            value = (settings or {}).get(key)
            if value is not None:
                body[wire_key] = value
        return body

    def _response(self, payload: Any) -> ModelResponse:
        """The reply as PydanticAI's response: text and tool calls, usage, and a reported cost."""
        message = first_choice(payload).get("message")
        message = message if isinstance(message, dict) else {}
        parts: list[ModelResponsePart] = []
        content = content_text(message.get("content"))
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            parts.append(ThinkingPart(content=reasoning))
        if isinstance(content, str) and content:
            parts.append(TextPart(content=content))
        ids: set[str] = set()
        calls = message.get("tool_calls")
        for index, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            arguments = function.get("arguments")
            # Each call needs an id of its own (its result is matched to it): a missing or repeated one is replaced.
            call_id = str(call.get("id") or "")
            suffix = 0
            while not call_id or call_id in ids:
                call_id, suffix = f"call_{index}" + (f"_{suffix}" if suffix else ""), suffix + 1
            ids.add(call_id)
            parts.append(
                ToolCallPart(
                    tool_name=str(function.get("name", "")),
                    args=arguments if isinstance(arguments, (str, dict)) else json.dumps(arguments),
                    tool_call_id=call_id,
                )
            )
        usage_data = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        usage = RequestUsage(
            input_tokens=token_count(usage_data.get("prompt_tokens")),
            output_tokens=token_count(usage_data.get("completion_tokens")),
        )
        cost = reported_cost(usage_data)
        usage.cost = Decimal(str(cost)) if cost is not None else Decimal(0)
        finish = first_choice(payload).get("finish_reason")
        return ModelResponse(
            parts=parts,
            usage=usage,
            model_name=str(payload.get("model") or self._model_name),
            provider_name="openai",
            provider_response_id=str(payload.get("id") or "") or None,
            provider_details={REPORTED_COST: cost} if cost is not None else None,
            finish_reason=_FINISH_REASONS.get(str(finish)) if finish else None,
        )


_FINISH_REASONS: dict[str, Any] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_call",
    "content_filter": "content_filter",
    "function_call": "tool_call",
}


def _request_messages(message: ModelRequest) -> list[dict[str, Any]]:
    wire: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, SystemPromptPart):
            wire.append({"role": "system", "content": part.content})
        elif isinstance(part, UserPromptPart):
            wire.append({"role": "user", "content": _user_text(part)})
        elif isinstance(part, ToolReturnPart):
            wire.append({"role": "tool", "tool_call_id": part.tool_call_id, "content": part.model_response_str()})
        else:
            raise UnsupportedMessage(f"chat completions cannot carry a {type(part).__name__}")
    return wire


def _user_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    texts = [item for item in part.content if isinstance(item, str)]
    if len(texts) != len(part.content):
        raise UnsupportedMessage("the root model is sent text only")
    return "\n".join(texts)


def _assistant_message(message: ModelResponse) -> dict[str, Any]:
    texts = [part.content for part in message.parts if isinstance(part, TextPart)]
    calls = [
        {
            "id": part.tool_call_id,
            "type": "function",
            "function": {"name": part.tool_name, "arguments": part.args_as_json_str()},
        }
        for part in message.parts
        if isinstance(part, ToolCallPart)
    ]
    wire: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        wire["tool_calls"] = calls
    return wire


def build_root_model(settings: Settings, client: ChatClient, *, model_name: str | None = None) -> ChatCompletionsModel:
    """The configured root model (or `model_name`: child runs of a recursive run use the sub model)."""
    return ChatCompletionsModel(
        client, model_name or settings.openai_model_name or "", base_url=settings.openai_api_base
    )
