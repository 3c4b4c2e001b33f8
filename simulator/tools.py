"""Function tool calls as vLLM's OpenAI server makes them with `--enable-auto-tool-choice`.

The call (name and JSON arguments built from the function's parameters schema) is decided up front
and deterministic; the engine only paces its tokens, so a stream reveals the arguments token by token.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from simulator import tokenizer

__all__ = ["ToolCallPlan", "ToolError", "example_arguments", "message_shapes", "plan_tool_call", "render_tools"]

_MAX_DEPTH = 6


class ToolError(ValueError):
    """A bad `tools`/`tool_choice`; the API layer answers it as a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCallPlan:
    """The one call this request answers with; `token_ids` are its arguments' tokens."""

    id: str
    name: str
    arguments: str
    token_ids: tuple[int, ...]
    finish_reason: str
    """vLLM says "tool_calls" for `required` and auto-detected calls, but "stop" for a named tool_choice."""
    content: str | None
    """The message content beside the calls: "" for a forced call, None for an auto-detected one."""

    def arguments_upto(self, n_tokens: int) -> str:
        return tokenizer.decode(self.token_ids[:n_tokens])

    def fragment(self, before: int, after: int) -> str:
        """The argument text the tokens [before, after) add (JSON is ASCII, so prefixes decode cleanly)."""
        return self.arguments_upto(after)[len(self.arguments_upto(before)):]

    def finish(self, n_tokens: int) -> str:
        return self.finish_reason if n_tokens >= len(self.token_ids) else "length"

    def message_call(self, n_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_upto(n_tokens)}}

    def opening_delta(self) -> dict[str, Any]:
        """The first streamed delta of the call: index, id, type and name, no arguments yet."""
        return {"index": 0, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}

    def arguments_delta(self, fragment: str) -> dict[str, Any]:
        return {"index": 0, "function": {"arguments": fragment}}


def _functions(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of tool objects", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           f"tools.{i}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", f"tools.{i}")
        out.append(fn)
    return out


def example_arguments(schema: Any, name: str = "value", depth: int = 0) -> Any:
    """A value that fits `schema`, the same every time: enum/const/default first, then by type."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_arguments(schema[key][0], name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        raw = schema.get("properties")
        props: dict[str, Any] = raw if isinstance(raw, dict) else {}
        required = schema.get("required")
        keys = [k for k in props if k in required] if isinstance(required, list) and required else list(props)
        return {k: example_arguments(props[k], k, depth + 1) for k in keys}
    if kind == "array":
        return [example_arguments(schema.get("items"), name, depth + 1)] if isinstance(schema.get("items"), dict) else []
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"sim-{name}"  # strings, and schemas that say nothing


def _last_message_asks(messages: Any, names: list[str]) -> str | None:
    """Auto mode: call a function when the LAST message is the user's and names it (a tool result never does)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    text = tokenizer.content_text(last.get("content"))
    return next((n for n in names if n in text), None)


def plan_tool_call(body: dict[str, Any]) -> ToolCallPlan | None:
    """The call a chat request answers with, or None for a text answer; 400s in vLLM's words."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice is not None and choice != "none":
            raise ToolError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        return None
    functions = _functions(tools)
    by_name = {fn["name"]: fn for fn in functions}
    if choice is None or choice == "auto":  # vLLM defaults to auto when tools are given
        name = _last_message_asks(body.get("messages"), list(by_name))
        if name is None:
            return None
        finish, content = "tool_calls", None
    elif choice == "none":
        return None
    elif choice == "required":
        name = _last_message_asks(body.get("messages"), list(by_name)) or functions[0]["name"]
        finish, content = "tool_calls", ""
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        name = choice["function"]["name"]
        if name not in by_name:
            raise ToolError(f"Tool '{name}' has not been passed in `tools`.", "tool_choice")
        finish, content = "stop", ""
    else:
        raise ToolError("tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    arguments = orjson.dumps(example_arguments(by_name[name].get("parameters") or {"type": "object"})).decode()
    return ToolCallPlan(id=f"chatcmpl-tool-{uuid.uuid4().hex}", name=name, arguments=arguments,
                        token_ids=tuple(tokenizer.encode(arguments)), finish_reason=finish, content=content)


def render_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as the chat template sees them: tool definitions first, tool calls as their JSON.

    Real templates put both in the prompt, so a continuation's prompt grows by the call it made.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return messages  # type: ignore[return-value]  # chat_prompt_text reports the error
    out: list[dict[str, Any]] = []
    if isinstance(body.get("tools"), list) and body["tools"]:
        out.append({"role": "system", "content": "Tools: " + orjson.dumps(body["tools"]).decode()})
    for msg in messages:
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if isinstance(calls, list) and calls:
            text = tokenizer.content_text(msg.get("content"))
            msg = {**msg, "content": text + orjson.dumps([c.get("function") for c in calls
                                                          if isinstance(c, dict)]).decode()}
        out.append(msg)
    return out


def message_shapes(messages: Any) -> list[dict[str, Any]]:
    """Roles and tool-call ids of the messages, no content: what /admin/requests shows of a prompt."""
    if not isinstance(messages, list):
        return []
    shapes = []
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        shape: dict[str, Any] = {"role": msg.get("role")}
        calls = msg.get("tool_calls")
        if isinstance(calls, list) and calls:
            shape["tool_calls"] = [{"id": c.get("id"), "name": (c.get("function") or {}).get("name")}
                                   for c in calls if isinstance(c, dict)]
        if msg.get("tool_call_id") is not None:
            shape["tool_call_id"] = msg["tool_call_id"]
        shapes.append(shape)
    return shapes
