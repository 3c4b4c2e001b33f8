"""OpenAI/vLLM wire shapes for the simulator: request validation, response and chunk bodies.

Validation raises ApiError, which carries its HTTP status and renders vLLM's error JSON.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeGuard

from simulator import tokenizer
from simulator.tools import ToolCallPlan, ToolError, plan_tool_call, render_tools


class ApiError(Exception):
    """An error a client sees as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        try:
            kind = HTTPStatus(self.status).phrase.replace(" ", "").replace("-", "") + "Error"
        except ValueError:
            kind = "Error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass
class GenerateParams:
    """A validated chat or completion request, reduced to what the engine and responses need."""

    kind: str  # "chat" | "completion"
    model: str
    lora: str | None
    prompt_token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    ignore_eos: bool
    seed: int | None
    priority: int
    cache_salt: str | None
    tool_call: ToolCallPlan | None = None
    """Set when the answer is a function call (tools with a forcing or matching tool_choice)."""
    output_offset: int = 0
    """With continue_final_message: the tokens of the final assistant message, which the output goes on from."""
    created: int = field(default_factory=lambda: int(time.time()))


def _opt_int(body: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", key)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"{key} must be at least {minimum}, got {value}.", key)
    return value


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean", key)
    return value


def resolve_model(body: dict[str, Any], served: list[str], loras: dict[str, str]) -> tuple[str, str | None]:
    """(model name to echo, LoRA adapter or None); 404 in vLLM's words for an unknown model."""
    model = body.get("model")
    if model is None:
        return served[0], None
    if model in served:
        return model, None
    if model in loras:
        return model, model
    raise ApiError(404, f"The model `{model}` does not exist.", "model")


def is_token_ids(value: Any) -> TypeGuard[list[int]]:
    """A non-empty list of ints (bools are not token ids)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def check_token_ids(ids: list[int], param: str) -> list[int]:
    """vLLM's check of client-sent token ids: every id inside the vocabulary, else a 400."""
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size()), None)
    if bad is not None:
        raise ApiError(400, f"Token id {bad} is out of vocabulary", param)
    return ids


def _prompt_ids(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if is_token_ids(prompt):
        return check_token_ids(list(prompt), "prompt")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "The simulator accepts one prompt per request.", "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")


def chat_prompt_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of message objects", "messages")
    try:
        return tokenizer.render_chat(render_tools(body), _opt_bool(body, "add_generation_prompt", True),
                                     _opt_bool(body, "continue_final_message", False))
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages") from exc


def parse_generate(kind: str, body: dict[str, Any], served: list[str], loras: dict[str, str],
                   max_model_len: int, priority_enabled: bool) -> GenerateParams:
    model, lora = resolve_model(body, served, loras)
    ids = tokenizer.encode(chat_prompt_text(body)) if kind == "chat" else _prompt_ids(body)
    n = _opt_int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "The simulator supports n=1 only.", "n")
    max_tokens = _opt_int(body, "max_completion_tokens", 1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    if max_tokens is None:
        # vLLM: chat fills the context; completions default to 16 tokens.
        max_tokens = max(1, max_model_len - len(ids)) if kind == "chat" else 16
    if len(ids) + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} "
                       f"in the completion). Please reduce the length of the messages or completion.",
                       "max_tokens")
    try:
        tool_call = plan_tool_call(body) if kind == "chat" else None
    except ToolError as exc:
        raise ApiError(400, str(exc), exc.param) from exc
    ignore_eos = _opt_bool(body, "ignore_eos", False)
    if tool_call is not None:
        # The engine paces exactly the call's tokens (fewer when max_tokens cuts the arguments short).
        max_tokens, ignore_eos = min(max_tokens, len(tool_call.token_ids)), True
    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    options = options or {}
    priority = _opt_int(body, "priority") or 0
    if priority != 0 and not priority_enabled:
        raise ApiError(400, f"Got priority {priority} but Priority scheduling is not enabled.", "priority")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError(400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    return GenerateParams(
        kind=kind, model=model, lora=lora, prompt_token_ids=ids, max_tokens=max_tokens, stream=stream,
        include_usage=bool(options.get("include_usage")), continuous_usage=bool(options.get("continuous_usage_stats")),
        ignore_eos=ignore_eos, seed=_opt_int(body, "seed"), priority=priority, cache_salt=salt,
        tool_call=tool_call, output_offset=_continued_tokens(kind, body))


def _continued_tokens(kind: str, body: dict[str, Any]) -> int:
    """How far into its output a continued assistant message already is (0 when nothing is continued)."""
    if kind != "chat" or not body.get("continue_final_message"):
        return 0
    last = body["messages"][-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        return 0
    return len(tokenizer.encode(last["content"]))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def full_response(p: GenerateParams, rid: str, text: str, finish_reason: str | None,
                  use: dict[str, Any]) -> dict[str, Any]:
    call = p.tool_call
    if call is not None:
        n = int(use["completion_tokens"])
        message = {"role": "assistant", "content": call.content, "reasoning_content": None,
                   "tool_calls": [call.message_call(n)]}
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": call.finish(n), "stop_reason": None}
        return {"id": rid, "object": "chat.completion", "created": p.created, "model": p.model,
                "choices": [choice], "usage": use, "prompt_logprobs": None}
    if p.kind == "chat":
        choice = {
            "index": 0, "message": {"role": "assistant", "content": text, "reasoning_content": None,
                                    "tool_calls": []},
            "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": None, "prompt_logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": p.created, "model": p.model, "choices": [choice],
            "usage": use, "prompt_logprobs": None}


def chunk(p: GenerateParams, rid: str, text: str | None, finish_reason: str | None,
          role: bool = False, use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk; `text=None` with `use` is the final usage-only chunk (empty choices)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if p.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                            **({"stop_reason": None} if finish_reason else {})})
        else:
            choices.append({"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                            "stop_reason": None})
    return _chunk_body(p, rid, choices, use)


def tool_chunk(p: GenerateParams, rid: str, call_delta: dict[str, Any], finish_reason: str | None = None,
               use: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed chunk of a tool call: its opening delta or an arguments fragment."""
    choice = {"index": 0, "delta": {"tool_calls": [call_delta]}, "logprobs": None, "finish_reason": finish_reason,
              **({"stop_reason": None} if finish_reason else {})}
    return _chunk_body(p, rid, [choice], use)


def _chunk_body(p: GenerateParams, rid: str, choices: list[dict[str, Any]],
                use: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
                           "created": p.created, "model": p.model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
