"""The OpenAI Responses API, run as chat completions on whichever backend the scheduler picks.

History comes from Redis (a previous_response_id chain or a conversation), so backends hold no
conversation state and any gateway replica can continue any conversation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.dispatch import new_exchange
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, error_response, to_gateway_error
from gateway.exchange import Exchange
from gateway.openai_requests import json_object, optional, parse_body, required_model
from gateway.proxy import ProxyResponse, Receive, Send
from gateway.sse import EventSplitter, event_json
from gateway.state.keys import new_hex, parse_conversation_id, parse_response_id, response_id
from gateway.state.store import StateStore, conversation_not_found, response_not_found
from gateway.state.translate import (
    call_item,
    chat_output_items,
    check_metadata,
    items_to_messages,
    message_item,
    normalise_items,
    responses_usage,
    text_format_to_chat,
    tool_choice_to_chat,
    tools_to_chat,
)
from gateway.upstream import forwardable_request_headers

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.config import StateConfig
    from gateway.services import Gateway

log = logging.getLogger("gravity.state")

__all__ = ["ResponsesRequest", "parse_responses_request", "prepare_response"]

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


@dataclass
class Turn:
    """One Responses call in flight: what to store when the backend has answered."""

    req: ResponsesRequest
    tenant: str
    id: str
    thread: str
    created_at: int
    lock_token: str
    settled: bool = False
    """The conversation lock is gone (committed or released): no need to release it again."""

    def response(self, status: str, output: list[Item], usage: dict[str, Any] | None,
                 incomplete: str | None = None) -> dict[str, Any]:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "temperature": req.temperature,
            "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "usage": usage, "metadata": req.metadata, "store": req.store,
            "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled", "background": False,
            "conversation": {"id": req.conversation_id} if req.conversation_id else None, "user": req.user,
        }


def scoped_tenant(request: Request) -> str | None:
    """A tenant an outer layer put in the request scope (an auth middleware, a test harness)."""
    tenant = request.scope.get("state", {}).get("tenant")
    return tenant if isinstance(tenant, str) and tenant else None


async def tenant_of(gw: Gateway, request: Request) -> str:
    """The caller's tenant for routes that do not dispatch (GET/DELETE of stored objects).

    The scope's tenant when an outer layer set one; else `gw.identify` (the API key's tenant
    with admission installed, raising its 401; the one default tenant without).
    """
    scoped = scoped_tenant(request)
    if scoped is not None:
        return scoped
    return await gw.identify(request.headers)


async def prepare_response(gw: Gateway, store: StateStore, request: Request, raw: bytes
                           ) -> tuple[Turn, Exchange]:
    """Parse, admit, rebuild the history and schedule; raises domain errors (the lock is released)."""
    req = parse_responses_request(raw, gw.cfg.state)
    own = new_hex()
    if req.previous_response_id:
        parsed = parse_response_id(req.previous_response_id)
        if parsed is None:
            raise response_not_found(req.previous_response_id, "previous_response_id")
        thread = parsed[1]
    elif req.conversation_id:
        conv_hex = parse_conversation_id(req.conversation_id)
        if conv_hex is None:
            raise conversation_not_found(req.conversation_id, "conversation")
        thread = conv_hex
    else:
        thread = own
    # Admission first, on the new input alone: it may name the tenant whose history we then read.
    provisional = orjson.dumps(chat_body(req, []))
    parsed_body = parse_body("chat/completions", provisional)
    request_id = request.scope["state"]["request_id"]
    ex = new_exchange(gw, "chat/completions", parsed_body, provisional, request.headers, request_id,
                      forwardable_request_headers(request.scope["headers"]))
    scoped = scoped_tenant(request)
    if scoped is not None:
        ex.tenant = scoped
    if ex.routing.session_id is None:
        # The thread is the natural session: its continuation wants the backend holding its cache.
        ex.routing = dataclasses.replace(ex.routing, session_id=f"thread:{thread}")
    turn = Turn(req, ex.tenant, response_id(own, thread), thread, int(time.time()), new_hex())
    ex.extras["state.turn"] = turn
    provisional_body = ex.body
    await gw.before_dispatch(ex, request.headers)
    ex.tenant = scoped or ex.tenant
    turn.tenant = ex.tenant
    # Fields admission added to the body (an upstream priority, say) carry over to the final one.
    added = {k: v for k, v in ex.body.items() if k != "messages" and provisional_body.get(k) != v}
    history: list[Item] = []
    if req.previous_response_id:
        history = await store.history(turn.tenant, req.previous_response_id)
    elif req.conversation_id:
        history = await store.begin_conversation(turn.tenant, req.conversation_id, turn.lock_token)
    try:
        if req.conversation_id and len(history) + len(req.items) > gw.cfg.state.max_conversation_items:
            raise InvalidRequest(f"Conversation '{req.conversation_id}' would exceed the limit of "
                                 f"{gw.cfg.state.max_conversation_items} items.", param="conversation",
                                 code="conversation_item_limit")
        final = orjson.dumps({**chat_body(req, history), **added})
        parsed_body = parse_body("chat/completions", final)
        ex.body, ex.raw = parsed_body.body, final
        ex.routing = dataclasses.replace(ex.routing, prompt=parsed_body.prompt,
                                         prompt_tokens=len(parsed_body.prompt) // 4)
        ex.decision = gw.scheduler.schedule(ex.routing)
    except BaseException:
        await release(store, turn)
        raise
    return turn, ex


async def release(store: StateStore, turn: Turn) -> None:
    if turn.req.conversation_id and not turn.settled:
        turn.settled = True
        try:
            await store.release_conversation(turn.tenant, turn.req.conversation_id, turn.lock_token)
        except Exception:
            log.warning("could not release conversation lock", exc_info=True)


async def commit(store: StateStore, turn: Turn, response: dict[str, Any]) -> None:
    """Store the response and append to its conversation in one atomic script."""
    obj = {k: v for k, v in response.items() if k != "output"}
    try:
        await store.save_response(turn.tenant, turn.id, turn.thread, store=turn.req.store, obj=obj,
                                  input_items=turn.req.items, output_items=response["output"],
                                  previous_id=turn.req.previous_response_id,
                                  conversation_id=turn.req.conversation_id, lock_token=turn.lock_token)
        turn.settled = True
    except GatewayError:
        raise
    except Exception as exc:
        log.warning("saving response %s failed", turn.id, exc_info=True)
        raise ServiceUnavailable("The response could not be saved: the state store is unavailable.",
                                 code="state_unavailable", retry_after=1) from exc


class _Collected:
    """Collects what ProxyResponse sends, to answer with a Responses object instead."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.chunks.append(message.get("body", b""))

    async def relay(self, send: Send) -> None:
        assert self.start is not None
        await send(self.start)
        await send({"type": "http.response.body", "body": b"".join(self.chunks), "more_body": False})


class ResponsesCall:
    """ASGI response: run the turn through the proxy, then store it and answer in the Responses shape."""

    def __init__(self, gw: Gateway, store: StateStore, turn: Turn, ex: Exchange) -> None:
        self.gw, self.store, self.turn, self.ex = gw, store, turn, ex

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            if self.turn.req.stream:
                await self._stream(scope, receive, send)
            else:
                await self._whole(scope, receive, send)
        finally:
            await release(self.store, self.turn)

    async def _whole(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        sink = _Collected()
        await ProxyResponse(self.gw, self.ex)(scope, receive, sink.send)
        if self.ex.outcome == "client_disconnect" or sink.start is None:
            return
        if sink.start["status"] != 200:
            await sink.relay(send)
            return
        try:
            chat = orjson.loads(b"".join(sink.chunks))
            choice = chat["choices"][0]
            output = chat_output_items(choice.get("message") or {})
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            await error_response(GatewayError("The backend returned a malformed chat completion.", status=502,
                                              code="bad_gateway"))(scope, receive, send)  # type: ignore[arg-type]
            return
        incomplete = "max_output_tokens" if choice.get("finish_reason") == "length" else None
        response = self.turn.response("incomplete" if incomplete else "completed", output,
                                      responses_usage(chat.get("usage")), incomplete)
        try:
            await commit(self.store, self.turn, response)
        except GatewayError as exc:
            await error_response(exc, self.ex.response_headers)(scope, receive, send)  # type: ignore[arg-type]
            return
        body = orjson.dumps(response)
        headers = [(k, v) for k, v in sink.start["headers"] if k.lower() not in (b"content-length",
                                                                                 b"content-type")]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        events = ResponseEvents(self.turn, send)
        await ProxyResponse(self.gw, self.ex)(scope, receive, events.send)
        if self.ex.outcome == "client_disconnect" or not events.started:
            return
        await events.finish(self.store)


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class ResponseEvents:
    """Translate a chat completions stream into the Responses event sequence as chunks arrive."""

    def __init__(self, turn: Turn, send: Send) -> None:
        self.turn = turn
        self._send = send
        self.started = False
        self._passthrough = False
        self._json = False
        self._seq = 0
        self._splitter = EventSplitter()
        self._output: list[Item] = []
        self._text: Item | None = None
        self._text_index = -1
        self._calls: dict[int, tuple[int, Item]] = {}
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None
        self._error: dict[str, Any] | None = None
        self._raw: list[bytes] = []

    async def _emit(self, *events: dict[str, Any]) -> None:
        out = []
        for event in events:
            out.append(_sse({**event, "sequence_number": self._seq}))
            self._seq += 1
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": True})

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                # An error before any event: the proxy's OpenAI-shaped error answers as it is.
                self._passthrough = True
                await self._send(message)
                return
            self.started = True
            headers = {k.lower(): v for k, v in message["headers"]}
            self._json = not headers.get(b"content-type", b"").startswith(b"text/event-stream")
            keep = [(k, v) for k, v in message["headers"] if k.lower() not in (b"content-type", b"content-length")]
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                *keep, (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
            created = self.turn.response("in_progress", [], None)
            await self._emit({"type": "response.created", "response": created},
                             {"type": "response.in_progress", "response": created})
            return
        if self._passthrough:
            await self._send(message)
            return
        body = message.get("body", b"")
        if self._json:
            self._raw.append(body)
            return
        for event in self._splitter.feed(body):
            await self._on_event(event)
        if not message.get("more_body") and (rest := self._splitter.rest()):
            await self._on_event(rest + b"\n\n")

    async def _on_event(self, event: bytes) -> None:
        payload = event_json(event)
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("error"), dict):
            self._error = payload["error"]
            return
        if isinstance(payload.get("usage"), dict):
            self._usage = payload["usage"]
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                await self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                await self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    async def _text_delta(self, text: str) -> None:
        if self._text is None:
            self._text = message_item("", status="in_progress")
            self._text["content"] = []
            self._text_index = len(self._output)
            self._output.append(self._text)
            await self._emit({"type": "response.output_item.added", "output_index": self._text_index,
                              "item": self._text},
                             {"type": "response.content_part.added", "item_id": self._text["id"],
                              "output_index": self._text_index, "content_index": 0,
                              "part": {"type": "output_text", "text": "", "annotations": []}})
            self._text["content"] = [{"type": "output_text", "text": "", "annotations": []}]
        self._text["content"][0]["text"] += text
        await self._emit({"type": "response.output_text.delta", "item_id": self._text["id"],
                          "output_index": self._text_index, "content_index": 0, "delta": text, "logprobs": []})

    async def _close_text(self) -> None:
        item, index = self._text, self._text_index
        if item is None or item["status"] == "completed":
            return
        item["status"] = "completed"
        part = item["content"][0]
        await self._emit({"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                          "content_index": 0, "text": part["text"], "logprobs": []},
                         {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                          "content_index": 0, "part": part},
                         {"type": "response.output_item.done", "output_index": index, "item": item})

    async def _call_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        fn = call.get("function") or {}
        if index not in self._calls:
            await self._close_text()  # a message item ends before the calls that follow it
            item = call_item(str(call.get("id") or ""), str(fn.get("name") or ""), "", status="in_progress")
            self._calls[index] = (len(self._output), item)
            self._output.append(item)
            await self._emit({"type": "response.output_item.added", "output_index": len(self._output) - 1,
                              "item": item})
        position, item = self._calls[index]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            await self._emit({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                              "output_index": position, "delta": fn["arguments"]})

    async def _close_calls(self) -> None:
        for position, item in self._calls.values():
            item["status"] = "completed"
            await self._emit({"type": "response.function_call_arguments.done", "item_id": item["id"],
                              "output_index": position, "arguments": item["arguments"]},
                             {"type": "response.output_item.done", "output_index": position, "item": item})

    async def _fail(self, error: dict[str, Any]) -> None:
        failed = self.turn.response("failed", self._output, responses_usage(self._usage))
        failed["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        await self._emit({"type": "error", "code": error.get("code"), "message": error.get("message", ""),
                          "param": error.get("param")},
                         {"type": "response.failed", "response": failed})

    async def finish(self, store: StateStore) -> None:
        if self._passthrough:
            return
        if self._json:
            await self._from_whole(b"".join(self._raw))
        if self._error is not None:
            await self._fail(self._error)
        else:
            await self._close_text()
            await self._close_calls()
            incomplete = "max_output_tokens" if self._finish == "length" else None
            response = self.turn.response("incomplete" if incomplete else "completed", self._output,
                                          responses_usage(self._usage), incomplete)
            try:
                # Stored before the client hears "completed", so it can continue at once.
                await commit(store, self.turn, response)
            except GatewayError as exc:
                await self._fail(exc.body()["error"])
            else:
                kind = "response.incomplete" if incomplete else "response.completed"
                await self._emit({"type": kind, "response": response})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _from_whole(self, body: bytes) -> None:
        """A backend that answered a stream request with one JSON body: replay it as events."""
        try:
            chat = orjson.loads(body)
            choice = chat["choices"][0]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            self._error = to_gateway_error(GatewayError("The backend returned a malformed chat completion.",
                                                        status=502, code="bad_gateway")).body()["error"]
            return
        message = choice.get("message") or {}
        if message.get("content"):
            await self._text_delta(message["content"])
        for i, call in enumerate(message.get("tool_calls") or []):
            await self._call_delta({**call, "index": i})
        self._finish = choice.get("finish_reason")
        self._usage = chat.get("usage")
