"""Parse and check OpenAI request bodies just enough to route them; the backend validates the rest.

Wrong types fail here with a 400 that names the parameter, as OpenAI does.
"""
from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson

from gateway.errors import BodyTooLarge, InvalidRequest, RequestTimeout
from gateway.httpserver import WHOLE_BODY

ROUTES = ("chat/completions", "completions", "embeddings")

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (docs/policies.md, "Request limits").

orjson parses 1,024 levels but serialises only 254, and the gateway re-serialises bodies it changes
(usage for streams, priority, Responses history), so the limit sits well below both."""


class ParsedBody:
    __slots__ = ("body", "cache_salt", "max_tokens", "model", "prompt", "stream", "user", "wants_usage")

    def __init__(self, body: dict[str, Any], model: str, stream: bool, wants_usage: bool, max_tokens: int,
                 prompt: bytes, cache_salt: str | None, user: str | None) -> None:
        self.body = body
        self.model = model
        self.stream = stream
        self.wants_usage = wants_usage
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.cache_salt = cache_salt
        self.user = user


MAX_EMBEDDING_DIMENSIONS = 65_536
"""Far above any embedding model's width (OpenAI's largest: 3,072); a backend asked for 10^9 may
try to build it."""


def _int(body: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name,
                             code="invalid_type")
    if v < minimum:
        raise InvalidRequest(f"Invalid '{name}': must be at least {minimum}.", param=name,
                             code="invalid_value")
    if maximum is not None and v > maximum:
        raise InvalidRequest(f"Invalid '{name}': must be at most {maximum}.", param=name,
                             code="invalid_value")
    return v


def optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise InvalidRequest(f"Invalid type for '{name}': expected {what}.", param=name, code="invalid_type")
    return v


def _content_bytes(content: Any) -> bytes:
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, list):
        return b"".join(
            (part.get("text") or "").encode() if isinstance(part, dict) and isinstance(part.get("text"), str)
            else b"" for part in content
        )
    return b""


def chat_prompt_bytes(messages: list[dict[str, Any]]) -> bytes:
    """A cheap stable rendering of the conversation for prefix hashing (bytes, not tokens)."""
    parts = []
    for m in messages:
        parts.append(str(m.get("role", "")).encode())
        parts.append(b"\x1f")
        parts.append(_content_bytes(m.get("content")))
        parts.append(b"\x1e")
    return b"".join(parts)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages",
                             code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"Invalid 'messages[{i}]': each message needs a string 'role'.",
                                 param=f"messages[{i}]", code="invalid_type")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"Invalid type for 'messages[{i}].content': expected a string or an array.",
                                 param=f"messages[{i}].content", code="invalid_type")
    return messages


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                push((child, depth + 1))
    return False


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or the 400 OpenAI gives for anything else (nesting too deep included)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit"):
            raise _nesting_error() from None
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be valid JSON.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Nesting needs at least as many brackets as levels: most bodies are ruled out without a walk.
    if (raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH) and _too_deep(body, MAX_JSON_DEPTH):
        raise _nesting_error()
    return body


def _nesting_error() -> InvalidRequest:
    return InvalidRequest(f"The request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep.",
                          code="nesting_too_deep")


def required_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter (a non-empty string).", param="model",
                             code="invalid_type" if model is not None else "missing_required_parameter")
    return model


def parse_body(route: str, raw: bytes) -> ParsedBody:
    body = json_object(raw)
    model = required_model(body)
    stream = bool(optional(body, "stream", bool, "a boolean"))
    opts = optional(body, "stream_options", dict, "an object")
    wants_usage = bool(opts.get("include_usage")) if opts else False
    max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1) or 0
    _int(body, "n", 1)
    optional(body, "temperature", (int, float), "a number")
    cache_salt = optional(body, "cache_salt", str, "a string")
    user = optional(body, "user", str, "a string")
    if route == "chat/completions":
        prompt = chat_prompt_bytes(_check_messages(body.get("messages")))
    elif route == "completions":
        p = body.get("prompt")
        if isinstance(p, str):
            prompt = p.encode()
        elif isinstance(p, list) and p:
            prompt = orjson.dumps(p)
        else:
            raise InvalidRequest("'prompt' must be a string or a non-empty array.", param="prompt",
                                 code="invalid_type")
    else:
        inp = body.get("input")
        if not isinstance(inp, (str, list)) or not inp:
            raise InvalidRequest("'input' must be a non-empty string or array.", param="input",
                                 code="invalid_type")
        prompt = inp.encode() if isinstance(inp, str) else orjson.dumps(inp)
        _int(body, "dimensions", 1, MAX_EMBEDDING_DIMENSIONS)
        stream = False
    return ParsedBody(body, model, stream, wants_usage, max_tokens, prompt, cache_salt, user)


async def read_body(scope: MutableMapping[str, Any], receive: Any, limit: int, timeout_s: float | None = None
                    ) -> bytes:
    """The whole request body, refused with 413 past `limit` bytes or 408 past `timeout_s` seconds."""
    extensions = scope.get("extensions")
    whole = extensions.get(WHOLE_BODY) if extensions else None
    if whole is not None:
        body: bytes | None = whole()
        if body is not None:  # it had all arrived: nothing to wait for, no deadline to set
            if len(body) > limit:
                raise BodyTooLarge(f"Request body of {len(body)} bytes exceeds the limit of {limit} bytes.")
            return body
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit() and int(v) > limit:
            raise BodyTooLarge(f"Request body of {v.decode()} bytes exceeds the limit of {limit} bytes.")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(receive, limit)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g}s.") from None


async def _read(receive: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""
