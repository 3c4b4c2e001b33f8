"""Admin routes for KV-event routing: the event-fed index's state, and a dry-run of the scheduler.

``POST /admin/route`` answers which backend this gateway would pick for a request body, without
dispatching it or teaching any index: what active-active replicas compare to check they agree.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.errors import InvalidRequest, error_response
from gateway.openai_requests import ROUTES, parse_body
from routing.types import EndpointView, RoutingRequest

if TYPE_CHECKING:
    from gateway.core import Core

__all__ = ["kv_routes"]


def _inflight(view: EndpointView | None) -> dict[str, int]:
    if view is None:
        return {}
    return {"requests": view.inflight_requests, "other_replicas": view.foreign_requests,
            "prompt_tokens": view.inflight_prompt_tokens + view.foreign_prompt_tokens,
            "unaccounted_waiting": view.unaccounted_waiting()}


def kv_routes(core: Core) -> list[BaseRoute]:
    async def kv_events(request: Request) -> Response:
        try:
            # Which endpoint holds which blocks is for operators, like /admin/backends.
            await core.admission.authorize_admin(request.headers)
        except Exception as exc:  # noqa: BLE001 - the one error mapping answers any auth failure
            return error_response(exc)
        state = core.kv_state
        body: dict[str, Any] = {"enabled": state is not None}
        if state is not None:
            body.update(state.describe())
        return Response(orjson.dumps(body), media_type="application/json")

    async def route(request: Request) -> Response:
        try:
            await core.admission.authorize_admin(request.headers)
            path = request.query_params.get("path", "chat/completions")
            if path not in ROUTES:
                raise InvalidRequest(f"path must be one of {', '.join(ROUTES)}", param="path")
            parsed = parse_body(path, await request.body())
            model, lora = core.pipeline.routing_model(parsed.model)
            # An admin may dry-run any profile; a rule or the default otherwise, as for a real request.
            req = RoutingRequest(model=model, lora=lora, prompt=parsed.prompt, cache_salt=parsed.cache_salt,
                                 prompt_tokens=len(parsed.prompt) // 4, max_tokens=parsed.max_tokens,
                                 session_id=request.headers.get("x-session-id"), route=path, body=parsed.body,
                                 profile=request.headers.get("x-gravity-profile") or None)
            if core.shared_inflight is not None:  # the view a real request would route on
                await core.shared_inflight.refresh()
            decision = core.scheduler.schedule(req)
        except Exception as exc:  # noqa: BLE001 - routing and parse errors answer OpenAI-shaped
            return error_response(exc)
        views = core.datastore.snapshot().endpoints
        # The in-flight counts the decision saw (all replicas' when shared): what replicas compare.
        ranked = [{"endpoint": c.endpoint, "score": c.score, "scores": c.scores,
                   "inflight": _inflight(views.get(c.endpoint))} for c in decision.ranked]
        return Response(orjson.dumps({"backend": decision.best.endpoint, "profile": decision.profile,
                                      "ranked": ranked}), media_type="application/json")

    return [Route("/admin/kv-events", kv_events, methods=["GET"]),
            Route("/admin/route", route, methods=["POST"])]
