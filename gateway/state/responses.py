"""The OpenAI Responses API, run as chat completions on whichever backend the scheduler picks.

History comes from Redis (a previous_response_id chain or a conversation), so backends hold no
conversation state and any gateway replica can continue any conversation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.dispatch import new_exchange
from gateway.errors import GatewayError, InvalidRequest, error_response
from gateway.exchange import Exchange
from gateway.openai_requests import parse_body
from gateway.proxy import ProxyResponse, Receive, Send
from gateway.state.events import ResponseEvents
from gateway.state.keys import new_hex, parse_conversation_id, parse_response_id, response_id
from gateway.state.request import Item, chat_body, parse_responses_request
from gateway.state.store import StateStore, conversation_not_found, response_not_found
from gateway.state.translate import (
    chat_output_items,
    responses_usage,
)
from gateway.state.turn import Turn, commit, release
from gateway.upstream import scope_headers

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.services import Gateway

log = logging.getLogger("gravity.state")

__all__ = ["ResponsesCall", "Turn", "prepare_response", "tenant_of"]

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
                      scope_headers(request.scope, gw.trusted_proxies))
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
    # ...and fields it removed (a client's own `priority`) stay removed.
    removed = provisional_body.keys() - ex.body.keys()
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
        rebuilt = {k: v for k, v in chat_body(req, history).items() if k not in removed}
        final = orjson.dumps({**rebuilt, **added})
        parsed_body = parse_body("chat/completions", final)
        ex.body, ex.raw = parsed_body.body, final
        ex.routing = dataclasses.replace(ex.routing, prompt=parsed_body.prompt,
                                         prompt_tokens=len(parsed_body.prompt) // 4)
        ex.decision = gw.scheduler.schedule(ex.routing)
    except BaseException:
        await release(store, turn)
        raise
    return turn, ex


class _Collected:
    """Collects what ProxyResponse sends, to answer with a Responses object instead."""

    def __init__(self) -> None:
        self.start: MutableMapping[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def send(self, message: MutableMapping[str, Any]) -> None:
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
                                              code="bad_gateway"))(scope, receive, send)
            return
        incomplete = "max_output_tokens" if choice.get("finish_reason") == "length" else None
        response = self.turn.response("incomplete" if incomplete else "completed", output,
                                      responses_usage(chat.get("usage")), incomplete)
        try:
            await commit(self.store, self.turn, response)
        except GatewayError as exc:
            await error_response(exc, self.ex.response_headers)(scope, receive, send)
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
