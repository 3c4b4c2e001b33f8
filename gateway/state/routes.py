"""HTTP routes of the state layer: Responses and Conversations, answered from Redis.

Each handler resolves the tenant, calls the store and answers JSON; every error goes through
the one error mapping, with Redis outages as 503 `state_unavailable`.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, error_response, is_expected
from gateway.openai_requests import json_object, read_body
from gateway.state.keys import new_hex
from gateway.state.responses import ResponsesCall, StateDeps, prepare_response, tenant_of
from gateway.state.translate import check_metadata, normalise_items

log = logging.getLogger("gravity.state")

__all__ = ["state_routes"]

Handler = Callable[..., Awaitable[Any]]
MAX_ITEMS_PER_CALL = 20  # OpenAI's limit for items added in one conversations call


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _api(handler: Handler) -> Handler:
    """Map every failure to the one OpenAI-shaped error body; Redis trouble is a 503."""
    @functools.wraps(handler)
    async def wrapped(*args: Any) -> Any:
        try:
            return await handler(*args)
        except RedisError as exc:
            log.warning("state store unavailable: %s", type(exc).__name__)
            return error_response(ServiceUnavailable("The state store is unavailable.", code="state_unavailable",
                                                     retry_after=1))
        except Exception as exc:
            if not isinstance(exc, GatewayError) and not hasattr(exc, "http_status"):
                log.exception("state request failed")
            return error_response(exc)
    return wrapped


async def _body(request: Request, limits: tuple[int, float]) -> dict[str, Any]:
    raw = await read_body(request.scope, request.receive, *limits)
    return json_object(raw) if raw else {}


def _page_params(request: Request) -> tuple[str | None, int, str]:
    q = request.query_params
    raw_limit = q.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequest("Invalid 'limit': expected an integer between 1 and 100.", param="limit",
                             code="invalid_value")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid 'order': expected 'asc' or 'desc'.", param="order", code="invalid_value")
    return q.get("after") or None, int(raw_limit), order


def page(items: list[dict[str, Any]], after: str | None, limit: int, order: str
         ) -> tuple[list[dict[str, Any]], bool]:
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise InvalidRequest(f"Item '{after}' is not in this list.", param="after", code="invalid_value")
        ordered = ordered[ids.index(after) + 1:]
    return ordered[:limit], len(ordered) > limit


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


class StateRoutes:
    def __init__(self, deps: StateDeps) -> None:
        self.deps, self.store = deps, deps.store

    @property
    def _limit(self) -> tuple[int, float]:
        """Body size and time limits."""
        server = self.deps.server
        return server.max_body_bytes, server.limits.body_timeout_s

    # -- responses -----------------------------------------------------------------------------
    async def create_response(self, request: Request) -> Any:
        try:
            raw = await read_body(request.scope, request.receive, *self._limit)
            turn, ex = await prepare_response(self.deps, request, raw)
        except Exception as exc:
            if isinstance(exc, RedisError):
                exc = ServiceUnavailable("The state store is unavailable.", code="state_unavailable",
                                         retry_after=1)
            elif not is_expected(exc):
                log.exception("responses request failed before dispatch")
            return error_response(exc)
        return ResponsesCall(self.deps, turn, ex)

    @_api
    async def get_response(self, request: Request) -> Response:
        stored = await self.store.get_response(await tenant_of(self.deps, request), request.path_params["response_id"])
        return _json(stored.public())

    @_api
    async def delete_response(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        await self.store.delete_response(await tenant_of(self.deps, request), rid)
        return _json({"id": rid, "object": "response", "deleted": True})

    @_api
    async def input_items(self, request: Request) -> Response:
        after, limit, order = _page_params(request)
        items = await self.store.response_input(await tenant_of(self.deps, request), request.path_params["response_id"])
        return _json(_list(*page(items, after, limit, order)))

    # -- conversations -------------------------------------------------------------------------
    @_api
    async def create_conversation(self, request: Request) -> Response:
        body = await _body(request, self._limit)
        cfg = self.deps.state
        items = normalise_items(body.get("items") or [], cfg.max_item_bytes, "items", MAX_ITEMS_PER_CALL)
        conversation = {"id": f"conv_{new_hex()}", "object": "conversation", "created_at": int(time.time()),
                        "metadata": check_metadata(body.get("metadata"))}
        await self.store.create_conversation(await tenant_of(self.deps, request), conversation, items)
        return _json(conversation)

    @_api
    async def get_conversation(self, request: Request) -> Response:
        return _json(await self.store.get_conversation(await tenant_of(self.deps, request), request.path_params["conversation_id"]))

    @_api
    async def update_conversation(self, request: Request) -> Response:
        body = await _body(request, self._limit)
        if "metadata" not in body:
            raise InvalidRequest("Missing required parameter: 'metadata'.", param="metadata",
                                 code="missing_required_parameter")
        return _json(await self.store.update_conversation(await tenant_of(self.deps, request), request.path_params["conversation_id"],
                                                          check_metadata(body["metadata"])))

    @_api
    async def delete_conversation(self, request: Request) -> Response:
        cid = request.path_params["conversation_id"]
        await self.store.delete_conversation(await tenant_of(self.deps, request), cid)
        return _json({"id": cid, "object": "conversation.deleted", "deleted": True})

    @_api
    async def list_items(self, request: Request) -> Response:
        after, limit, order = _page_params(request)
        data, more = await self.store.list_items(await tenant_of(self.deps, request), request.path_params["conversation_id"],
                                                 after=after, limit=limit, order=order)
        return _json(_list(data, more))

    @_api
    async def add_items(self, request: Request) -> Response:
        body = await _body(request, self._limit)
        if not isinstance(body.get("items"), list) or not body["items"]:
            raise InvalidRequest("'items' must be a non-empty array.", param="items",
                                 code="missing_required_parameter" if "items" not in body else "invalid_value")
        items = normalise_items(body["items"], self.deps.state.max_item_bytes, "items", MAX_ITEMS_PER_CALL)
        await self.store.append_items(await tenant_of(self.deps, request), request.path_params["conversation_id"], items)
        return _json(_list(items, False))

    @_api
    async def get_item(self, request: Request) -> Response:
        p = request.path_params
        return _json(await self.store.get_item(await tenant_of(self.deps, request), p["conversation_id"], p["item_id"]))

    @_api
    async def delete_item(self, request: Request) -> Response:
        p = request.path_params
        return _json(await self.store.delete_item(await tenant_of(self.deps, request), p["conversation_id"], p["item_id"]))


def state_routes(deps: StateDeps) -> list[BaseRoute]:
    r = StateRoutes(deps)
    return [
        Route("/v1/responses", r.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", r.get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", r.delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", r.input_items, methods=["GET"]),
        Route("/v1/conversations", r.create_conversation, methods=["POST"]),
        Route("/v1/conversations/{conversation_id}", r.get_conversation, methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", r.update_conversation, methods=["POST"]),
        Route("/v1/conversations/{conversation_id}", r.delete_conversation, methods=["DELETE"]),
        Route("/v1/conversations/{conversation_id}/items", r.list_items, methods=["GET"]),
        Route("/v1/conversations/{conversation_id}/items", r.add_items, methods=["POST"]),
        Route("/v1/conversations/{conversation_id}/items/{item_id}", r.get_item, methods=["GET"]),
        Route("/v1/conversations/{conversation_id}/items/{item_id}", r.delete_item, methods=["DELETE"]),
    ]
