"""`create_app(config)`: the ASGI application and its lifespan.

Routes are thin: parse, decide (routing, policies), then hand the exchange to the proxy.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import GatewayConfig
from gateway.conn_guard import ConnectionGuard, ConnectionLimits
from gateway.dispatch import new_exchange, schedule
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    error_response,
    is_expected,
    to_gateway_error,
)
from gateway.metrics import UNROUTED
from gateway.openai_requests import ClientGone, parse_body, read_body
from gateway.proxy import ProxyResponse
from gateway.services import Gateway
from gateway.upstream import scope_headers

log = logging.getLogger("gravity")

_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


_PROXIED = {b"/v1/chat/completions": "chat/completions", b"/v1/completions": "completions",
            b"/v1/embeddings": "embeddings"}


def _client_request_id(scope: MutableMapping[str, Any]) -> bytes | None:
    """The client's own `x-request-id` when sane: echoed and logged, never used as an identity."""
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            return v if _SANE_REQUEST_ID.match(v) else None
    return None


class GatewayApp:
    """The outermost ASGI app: every response gets `x-request-id`, and the proxied OpenAI POST
    routes go straight to their handler (they answer their own errors), skipping the router.

    Each request gets an id of the gateway's own (`scope["state"]["request_id"]`): it names the
    request to the limiter, the backends and the logs, so a client repeating an id cannot collide
    with another request. A sane client id is echoed back and logged beside it."""

    def __init__(self, gw: Gateway, inner: Starlette, guard: ConnectionGuard) -> None:
        self.gw = gw
        self.inner = inner
        self.state = inner.state
        self.connection_guard = guard
        """Connection limits for the server to wrap its protocol with (`gravity serve` does)."""

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        try:
            await self._http(scope, receive, send)
        finally:
            self.connection_guard.response_done(scope.get("client"))

    async def _http(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        internal = os.urandom(16).hex()
        client_id = _client_request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = internal
        state["client_request_id"] = client_id.decode() if client_id is not None else None
        rid = client_id if client_id is not None else internal.encode()

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        if not scope["raw_path"].startswith(b"/v1/"):
            await self.inner(scope, receive, send_with_id)
            return
        inflight = self.gw.metrics.inflight
        inflight.inc()
        try:
            route = _PROXIED.get(scope["raw_path"]) if scope["method"] == "POST" else None
            if route is None:
                await self.inner(scope, receive, send_with_id)
                return
            response = await handle_proxy(self.gw, route, scope, receive)
            await response(scope, receive, send_with_id)
        finally:
            inflight.dec()


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def handle_proxy(gw: Gateway, route: str, scope: MutableMapping[str, Any], receive: Any
                       ) -> Response | ProxyResponse:
    """Parse, admit and schedule; the returned ProxyResponse performs the upstream call."""
    model = "unknown"
    ex = None
    try:
        raw = await read_body(scope, receive, gw.cfg.server.max_body_bytes, gw.cfg.server.limits.body_timeout_s)
        parsed = parse_body(route, raw)
        model = parsed.model
        headers = Headers(scope=scope)
        ex = new_exchange(gw, route, parsed, raw, headers, scope["state"]["request_id"],
                          scope_headers(scope, gw.trusted_proxies))
        await schedule(gw, ex, headers)
    except Exception as exc:
        err = to_gateway_error(exc)
        if not is_expected(exc) and not isinstance(exc, ClientGone):
            log.exception("request %s failed before dispatch", scope["state"]["request_id"])
        elif err.status >= 500:
            gw.outcomes.note(f"refused:{err.code}", "requests refused before dispatch: %d %s (%s)",
                                err.status, err.code, err.message)
        if err.code in ("model_not_found", "no_healthy_backend"):
            served = model if err.code == "no_healthy_backend" else UNROUTED
            gw.metrics.routing_errors.labels(served, err.code or "").inc()
        if ex is not None:
            # Admitted but not dispatched: let the hooks refund what admission reserved.
            ex.status, ex.outcome = err.status, "error"
            await gw.finish(ex)
            return error_response(err, ex.response_headers)
        return error_response(err)
    return ProxyResponse(gw, ex)


async def proxy_route(request: Request, route: str) -> Response | ProxyResponse:
    return await handle_proxy(_gateway(request), route, request.scope, request.receive)


async def chat_completions(request: Request) -> Response | ProxyResponse:
    return await proxy_route(request, "chat/completions")


async def completions(request: Request) -> Response | ProxyResponse:
    return await proxy_route(request, "completions")


async def embeddings(request: Request) -> Response | ProxyResponse:
    return await proxy_route(request, "embeddings")


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    created = int(gw.started_at)
    data = [{"id": m, "object": "model", "created": created, "owned_by": "gravity"}
            for m in sorted(gw.datastore.served_models())]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    ok, missing = _gateway(request).ready()
    body = {"status": "ready" if ok else "not_ready", "models_without_healthy_backend": missing}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(_gateway(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def admin_backends(request: Request) -> Response:
    gw = _gateway(request)
    try:
        # Backend URLs and load are not for anonymous callers once API keys are on.
        await gw.identify(request.headers)
    except Exception as exc:  # noqa: BLE001 - the one error mapping answers any auth failure
        return error_response(exc)
    return Response(orjson.dumps(gw.datastore.describe(), default=str), media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown request URL: {request.method} {request.url.path}."))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."))
    return error_response(GatewayError(str(exc.detail), status=exc.status_code, type="invalid_request_error",
                                       code=None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(exc)


def create_app(cfg: GatewayConfig, gateway: Gateway | None = None) -> GatewayApp:
    gw = gateway or Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/backends", admin_backends, methods=["GET"]),
        *gw.extra_routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.gateway = gw
    limits = cfg.server.limits
    guard = ConnectionGuard(ConnectionLimits(
        header_timeout_s=limits.header_timeout_s, idle_timeout_s=limits.idle_timeout_s,
        max_connections=limits.max_connections, max_head_bytes=limits.max_head_bytes))
    return GatewayApp(gw, app, guard)
