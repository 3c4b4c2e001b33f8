"""Turn a parsed OpenAI request into a scheduled Exchange, ready for the proxy.

Shared by the HTTP routes and by gateway-served APIs (Responses) that call a backend internally.
"""
from __future__ import annotations

from collections.abc import Mapping

from gateway.exchange import Exchange
from gateway.openai_requests import ParsedBody
from gateway.services import Gateway
from routing.types import RoutingRequest


def new_exchange(gw: Gateway, route: str, parsed: ParsedBody, raw: bytes, headers: Mapping[str, str],
                 request_id: str, forward_headers: dict[str, str]) -> Exchange:
    session_id = headers.get("x-session-id") or (parsed.user if gw.cfg.routing.session_from_user else None)
    routing_req = RoutingRequest(
        model=parsed.model, prompt=parsed.prompt, session_id=session_id, cache_salt=parsed.cache_salt,
        # bytes/4 is the cheap estimate; admission may replace it with a measured count.
        prompt_tokens=len(parsed.prompt) // 4, max_tokens=parsed.max_tokens,
        priority=headers.get("x-gravity-priority", "standard"), request_id=request_id,
    )
    forward_headers["x-request-id"] = request_id
    return Exchange(
        request_id=request_id, route=route, model=parsed.model, body=parsed.body, raw=raw,
        stream=parsed.stream, client_wants_usage=parsed.wants_usage, routing=routing_req,
        forward_headers=forward_headers,
    )


async def schedule(gw: Gateway, ex: Exchange, headers: Mapping[str, str]) -> None:
    """Admission and state hooks, then the routing decision; raises domain errors."""
    await gw.before_dispatch(ex, headers)
    ex.decision = gw.scheduler.schedule(ex.routing)
