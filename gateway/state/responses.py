"""The OpenAI Responses API, run as chat completions on whichever backend the scheduler picks.

History comes from Redis (a previous_response_id chain or a conversation), so backends hold no
conversation state and any gateway replica can continue any conversation.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from gateway.config import ServerConfig, StateConfig
from gateway.dispatcher import Dispatcher
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, error_response, to_gateway_error
from gateway.exchange import Exchange
from gateway.metrics import GatewayMetrics
from gateway.openai_requests import parse_body
from gateway.pipeline import Pipeline
from gateway.proxy import ProxyResponse, Receive, Send
from gateway.state.events import ResponseEvents
from gateway.state.keys import new_hex, parse_conversation_id, parse_response_id, response_id
from gateway.state.request import Item, ResponsesRequest, chat_body, parse_responses_request
from gateway.state.store import StateStore, conversation_not_found, response_not_found
from gateway.state.translate import (
    chat_output_items,
    responses_usage,
)
from gateway.state.turn import Turn, commit, release
from gateway.upstream import TrustedProxies, scope_headers
from routing.types import evolve

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("gravity.state")

__all__ = ["ResponsesCall", "StateDeps", "Turn", "prepare_response", "tenant_of"]

Identify = Callable[[Mapping[str, str]], Awaitable[str]]


@dataclass(frozen=True)
class StateDeps:
    """What the state routes need of the rest of the gateway (handed over by `create_app`)."""

    store: StateStore
    pipeline: Pipeline
    dispatcher: Dispatcher
    metrics: GatewayMetrics
    identify: Identify
    """The caller's tenant from request headers for routes that do not dispatch (401 on a bad key)."""
    state: StateConfig
    server: ServerConfig
    trusted: TrustedProxies


def scoped_tenant(request: Request) -> str | None:
    """A tenant an outer layer put in the request scope (an auth middleware, a test harness)."""
    tenant = request.scope.get("state", {}).get("tenant")
    return tenant if isinstance(tenant, str) and tenant else None


async def tenant_of(deps: StateDeps, request: Request) -> str:
    """The caller's tenant for routes that do not dispatch (GET/DELETE of stored objects).

    The scope's tenant when an outer layer set one; else the API key's tenant (raising its 401),
    or the one default tenant when auth is off.
    """
    scoped = scoped_tenant(request)
    if scoped is not None:
        return scoped
    return await deps.identify(request.headers)


def _thread_of(req: ResponsesRequest, own: str) -> str:
    if req.previous_response_id:
        parsed = parse_response_id(req.previous_response_id)
        if parsed is None:
            raise response_not_found(req.previous_response_id, "previous_response_id")
        return parsed[1]
    if req.conversation_id:
        conv_hex = parse_conversation_id(req.conversation_id)
        if conv_hex is None:
            raise conversation_not_found(req.conversation_id, "conversation")
        return conv_hex
    return own


async def prepare_response(deps: StateDeps, request: Request, raw: bytes) -> tuple[Turn, Exchange]:
    """Parse, authenticate, read the history, reserve for what is really sent, and route.

    The order makes leaks impossible: nothing is reserved until the history is read (a missing
    response, a 409 on a busy conversation or a Redis failure there costs no budget), and any failure
    after the reservation finishes the exchange, which refunds it, and releases the conversation lock.
    """
    req = parse_responses_request(raw, deps.state)
    own = new_hex()
    thread = _thread_of(req, own)
    provisional = orjson.dumps(chat_body(req, []))
    state = request.scope["state"]
    ex = deps.pipeline.exchange("chat/completions", parse_body("chat/completions", provisional), provisional,
                                request.headers, state["request_id"], scope_headers(request.scope, deps.trusted),
                                state.get("client_request_id"))
    state["exchange"] = ex  # its access-log line comes from the pipeline (GatewayApp writes none)
    scoped = scoped_tenant(request)
    if ex.routing.session_id is None:
        # The thread is the natural session: its continuation wants the backend holding its cache.
        ex.routing = evolve(ex.routing, session_id=f"thread:{thread}")
    turn: Turn | None = None
    try:
        key = await deps.pipeline.authenticate(ex, request.headers)
        ex.tenant = scoped or ex.tenant
        turn = Turn(req, ex.tenant, response_id(own, thread), thread, int(time.time()), new_hex())
        ex.extras["state.turn"] = turn
        history: list[Item] = []
        if req.previous_response_id:
            history = await deps.store.history(turn.tenant, req.previous_response_id)
        elif req.conversation_id:
            history = await deps.store.begin_conversation(turn.tenant, req.conversation_id, turn.lock_token)
        if req.conversation_id and len(history) + len(req.items) > deps.state.max_conversation_items:
            raise InvalidRequest(f"Conversation '{req.conversation_id}' would exceed the limit of "
                                 f"{deps.state.max_conversation_items} items.", param="conversation",
                                 code="conversation_item_limit")
        final = orjson.dumps(chat_body(req, history))
        parsed = parse_body("chat/completions", final)
        ex.replace_body(parsed.body, final)
        ex.routing = evolve(ex.routing, prompt=parsed.prompt, prompt_tokens=len(parsed.prompt) // 4)
        await deps.pipeline.reserve(ex, key)
        deps.pipeline.route(ex)
    except BaseException as exc:
        if turn is not None:
            await release(deps.store, turn)
        if isinstance(exc, RedisError):
            exc = ServiceUnavailable("The state store is unavailable.", code="state_unavailable", retry_after=1)
        ex.outcome = "error"
        ex.status = to_gateway_error(exc).status if isinstance(exc, Exception) else 499
        await deps.pipeline.finish(ex)
        raise exc from None
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
    """ASGI response: run the turn through the dispatcher, then store it and answer in the Responses shape.

    While the turn runs, its conversation lock is renewed, so a stream longer than
    `state.conversation_lock_s` still commits."""

    def __init__(self, deps: StateDeps, turn: Turn, ex: Exchange) -> None:
        self.deps, self.store, self.turn, self.ex = deps, deps.store, turn, ex

    def _proxy(self) -> ProxyResponse:
        d = self.deps
        return ProxyResponse(d.pipeline, d.dispatcher, d.metrics, self.ex)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        renewal = (asyncio.create_task(self._renew(), name="gravity-lock-renewal")
                   if self.turn.req.conversation_id else None)
        try:
            if self.turn.req.stream:
                await self._stream(scope, receive, send)
            else:
                await self._whole(scope, receive, send)
        finally:
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
            await release(self.store, self.turn)
            await self.deps.pipeline.finish(self.ex)  # already done by the proxy unless it never ran

    async def _renew(self) -> None:
        turn = self.turn
        assert turn.req.conversation_id is not None
        every = self.deps.state.conversation_lock_s / 3
        while not turn.settled:
            await asyncio.sleep(every)
            try:
                if not await self.store.renew_conversation(turn.tenant, turn.req.conversation_id, turn.lock_token):
                    log.warning("response %s lost its conversation lock", turn.id)
                    return
            except Exception:
                log.warning("could not renew the conversation lock of response %s", turn.id, exc_info=True)

    async def _whole(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        sink = _Collected()
        await self._proxy()(scope, receive, sink.send)
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
        await self._proxy()(scope, receive, events.send)
        if self.ex.outcome == "client_disconnect" or not events.started:
            return
        await events.finish(self.store)
