"""A Responses API request: parsed and checked, and turned into the chat completions body it runs as."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequest
from gateway.openai_requests import json_object, optional, required_model
from gateway.state.translate import (
    check_metadata,
    items_to_messages,
    normalise_items,
    text_format_to_chat,
    tool_choice_to_chat,
    tools_to_chat,
)

if TYPE_CHECKING:

    from gateway.config import StateConfig


__all__ = ["Item", "ResponsesRequest", "chat_body", "parse_responses_request"]

Item = dict[str, Any]

# vLLM sampling extras a client may send through `extra_body`; passed to the backend unchanged.
_PASSTHROUGH = ("seed", "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop",
                "frequency_penalty", "presence_penalty", "cache_salt", "priority")
_UNSUPPORTED = {"background": "background responses", "prompt": "prompt templates",
                "previous_response_item_id": "item references"}


@dataclass
class ResponsesRequest:
    body: dict[str, Any]
    model: str
    items: list[Item]
    instructions: str | None
    previous_response_id: str | None
    conversation_id: str | None
    store: bool
    stream: bool
    tools: list[Any] | None
    tool_choice: Any
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    user: str | None
    text: Any


def parse_responses_request(raw: bytes, cfg: StateConfig) -> ResponsesRequest:
    body = json_object(raw)
    model = required_model(body)
    for name, what in _UNSUPPORTED.items():
        if body.get(name):
            raise InvalidRequest(f"'{name}' ({what}) is not supported by this gateway.", param=name,
                                 code="unsupported_parameter")
    if body.get("input") is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                             code="missing_required_parameter")
    items = normalise_items(body["input"], cfg.max_item_bytes)
    if len(items) > cfg.max_conversation_items:
        raise InvalidRequest(f"'input' has more than {cfg.max_conversation_items} items.", param="input",
                             code="array_above_max_length")
    previous = optional(body, "previous_response_id", (str,), "a string")
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not isinstance(conversation, str):
        raise InvalidRequest("Invalid type for 'conversation': expected a string or an object with an 'id'.",
                             param="conversation", code="invalid_type")
    if previous and conversation:
        raise InvalidRequest("'previous_response_id' and 'conversation' cannot be used together.",
                             param="conversation", code="invalid_value")
    max_output = optional(body, "max_output_tokens", (int,), "an integer")
    if max_output is not None and max_output < 1:
        raise InvalidRequest("Invalid 'max_output_tokens': must be at least 1.", param="max_output_tokens",
                             code="invalid_value")
    temperature = optional(body, "temperature", (int, float), "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidRequest("Invalid 'temperature': must be between 0 and 2.", param="temperature",
                             code="invalid_value")
    store = optional(body, "store", (bool,), "a boolean")
    parallel = optional(body, "parallel_tool_calls", (bool,), "a boolean")
    tools = optional(body, "tools", (list,), "an array")
    tools_to_chat(tools)
    tool_choice_to_chat(body.get("tool_choice"))
    text_format_to_chat(body.get("text"))
    return ResponsesRequest(
        body=body, model=model, items=items, instructions=optional(body, "instructions", (str,), "a string"),
        previous_response_id=previous, conversation_id=conversation, store=store is not False,
        stream=bool(optional(body, "stream", (bool,), "a boolean")), tools=tools,
        tool_choice=body.get("tool_choice"), max_output_tokens=max_output, temperature=temperature,
        top_p=optional(body, "top_p", (int, float), "a number"), metadata=check_metadata(body.get("metadata")),
        parallel_tool_calls=parallel is not False, user=optional(body, "user", (str,), "a string"),
        text=body.get("text"),
    )


def chat_body(req: ResponsesRequest, history: list[Item]) -> dict[str, Any]:
    """The chat completions request for this turn: instructions, history, then the new input."""
    body: dict[str, Any] = {"model": req.model,
                            "messages": items_to_messages([*history, *req.items], req.instructions)}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    optional = {
        "max_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "tools": tools_to_chat(req.tools) or None, "tool_choice": tool_choice_to_chat(req.tool_choice),
        "response_format": text_format_to_chat(req.text), "user": req.user,
    }
    if req.tools:
        optional["parallel_tool_calls"] = req.parallel_tool_calls
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update({k: req.body[k] for k in _PASSTHROUGH if req.body.get(k) is not None})
    return body


