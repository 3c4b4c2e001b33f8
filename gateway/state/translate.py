"""Responses API items <-> chat completions: validation, stored item shapes, and the translation.

Pure functions. The same items always render to the same chat messages, byte for byte, so a
rebuilt history hashes to the prefix the backend already holds in its KV cache.
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.state.keys import new_item_id

__all__ = [
    "chat_output_items",
    "check_metadata",
    "items_to_messages",
    "normalise_items",
    "responses_usage",
    "text_format_to_chat",
    "tool_choice_to_chat",
    "tools_to_chat",
]

Item = dict[str, Any]

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
    if len(value) > 16:
        raise _bad(f"Invalid '{param}': at most 16 key-value pairs are allowed.", param)
    for k, v in value.items():
        if len(k) > 64:
            raise _bad(f"Invalid '{param}': keys may have at most 64 characters.", f"{param}.{k[:64]}")
        if not isinstance(v, str) or len(v) > 512:
            raise _bad(f"Invalid '{param}.{k}': values must be strings of at most 512 characters.",
                       f"{param}.{k}")
    return dict(value)


def _text_part(role: str, text: str) -> Item:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def _content(role: str, content: Any, param: str) -> list[Item]:
    if isinstance(content, str):
        return [_text_part(role, content)]
    if not isinstance(content, list):
        raise _bad(f"Invalid type for '{param}': expected a string or an array of content parts.", param,
                   "invalid_type")
    parts: list[Item] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append(_text_part(role, part["text"]))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "refusal", "refusal": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "input_image", "image_url": part["image_url"],
                          "detail": part.get("detail") or "auto"})
        elif kind in ("input_image", "input_file", "input_audio"):
            raise _bad(f"'{where}': {kind} parts are supported only as an image_url (file_id and files are "
                       "not supported by this gateway).", where, "unsupported_value")
        else:
            raise _bad(f"Invalid '{where}': expected a content part with a 'type' of input_text, output_text "
                       "or input_image.", where, "invalid_type")
    return parts


def _item(raw: Any, param: str) -> Item:
    if not isinstance(raw, dict):
        raise _bad(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
    kind = raw.get("type", "message")
    if kind == "message":
        role = raw.get("role")
        if role not in _ROLES:
            raise _bad(f"Invalid '{param}.role': expected one of {', '.join(_ROLES)}.", f"{param}.role")
        return {"id": new_item_id("msg"), "type": "message", "role": role,
                "content": _content(role, raw.get("content"), f"{param}.content"), "status": "completed"}
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(raw.get(name), str):
                raise _bad(f"Invalid '{param}.{name}': expected a string.", f"{param}.{name}", "invalid_type")
        return {"id": new_item_id("fc"), "type": "function_call", "call_id": raw["call_id"], "name": raw["name"],
                "arguments": raw["arguments"], "status": "completed"}
    if kind == "function_call_output":
        output = raw.get("output")
        if isinstance(output, list):
            output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
        if not isinstance(raw.get("call_id"), str) or not isinstance(output, str):
            raise _bad(f"Invalid '{param}': a function_call_output needs a string 'call_id' and 'output'.",
                       param, "invalid_type")
        return {"id": new_item_id("fco"), "type": "function_call_output", "call_id": raw["call_id"],
                "output": output, "status": "completed"}
    if kind == "reasoning":
        # Reasoning items carry nothing a chat backend can take back; keep them out of history.
        return {}
    raise _bad(f"Unsupported input item type '{kind}' at '{param}' (supported: message, function_call, "
               "function_call_output).", f"{param}.type", "unsupported_value")


def normalise_items(value: Any, max_item_bytes: int, param: str = "input", max_items: int | None = None
                    ) -> list[Item]:
    """Check client items and give each a fresh id in the stored (OpenAI output) shape."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad(f"Invalid type for '{param}': expected a string or an array of items.", param, "invalid_type")
    if max_items is not None and len(value) > max_items:
        raise _bad(f"Invalid '{param}': at most {max_items} items may be added at once.", param,
                   "array_above_max_length")
    items = []
    for i, raw in enumerate(value):
        item = _item(raw, f"{param}[{i}]")
        if not item:
            continue
        size = len(orjson.dumps(item))
        if size > max_item_bytes:
            raise _bad(f"'{param}[{i}]' is {size} bytes; the limit per item is {max_item_bytes} bytes.",
                       f"{param}[{i}]", "item_too_large")
        items.append(item)
    return items


def _chat_content(parts: list[Item]) -> str | list[Item]:
    texts = [p.get("text") or p.get("refusal") or "" for p in parts if p["type"] != "input_image"]
    if len(texts) == len(parts) and len(parts) == 1:
        return texts[0]
    out: list[Item] = []
    for p in parts:
        if p["type"] == "input_image":
            out.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p.get("detail", "auto")}})
        else:
            out.append({"type": "text", "text": p.get("text") or p.get("refusal") or ""})
    return out


def items_to_messages(items: list[Item], instructions: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for stored items. Deterministic: the same items give the same bytes."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": _chat_content(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            # One assistant turn: its text and the calls that followed it are one chat message.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return out


def tools_to_chat(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"Unsupported tool type '{kind}' at 'tools[{i}]': this gateway runs function tools only.",
                       f"tools[{i}].type", "unsupported_value")
        if not isinstance(tool.get("name"), str):
            raise _bad(f"Invalid 'tools[{i}].name': expected a string.", f"tools[{i}].name", "invalid_type")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_to_chat(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("Invalid 'tool_choice': expected auto, none, required or a function.", "tool_choice")


def text_format_to_chat(text: Any) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (None for plain text)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("Invalid 'text.format': expected text, json_object or json_schema.", "text.format")


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> Item:
    return {"id": item_id or new_item_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
              status: str = "completed") -> Item:
    return {"id": item_id or new_item_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def chat_output_items(message: dict[str, Any]) -> list[Item]:
    """Output items for one chat completion message: its text, then its tool calls."""
    items: list[Item] = []
    text = message.get("content")
    calls = message.get("tool_calls") or []
    if isinstance(text, str) and (text or not calls):
        items.append(message_item(text))
    for call in calls:
        fn = call.get("function") or {}
        items.append(call_item(str(call.get("id") or new_item_id("call")), str(fn.get("name") or ""),
                               str(fn.get("arguments") or "")))
    return items


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
