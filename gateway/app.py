"""`create_app(config)`: the HTTP edge (ASGI) in front of the parts `build_core` makes.

Routes are thin: the proxied OpenAI routes go straight to `ProxyRoutes` (parse, admit, route, then
the Dispatcher answers); health, readiness, metrics and admin go through Starlette, as do the
Responses and Conversations routes of the state layer.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import GatewayConfig
from gateway.conn_guard import ConnectionGuard, ConnectionLimits
from gateway.core import Core, build_core
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    error_response,
    is_expected,
)
from gateway.kv_routes import kv_routes
from gateway.proxy import ECHO_ID, ProxyResponse, ProxyRoutes
from gateway.state.responses import StateDeps
from gateway.state.routes import state_routes

log = logging.getLogger("gravity")

__all__ = ["GatewayApp", "create_app"]

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

    def __init__(self, core: Core, inner: Starlette, proxy: ProxyRoutes, guard: ConnectionGuard) -> None:
        self.core = core
        self.inner = inner
        self.proxy = proxy
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
        started = time.perf_counter()
        internal = os.urandom(16).hex()
        client_id = _client_request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = internal
        state["client_request_id"] = client_id.decode() if client_id is not None else None
        rid = client_id if client_id is not None else internal.encode()
        status = 0

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
                state["response_status"] = message["status"]  # for the SERVER span
            await send(message)

        raw_path = scope["raw_path"]
        if not raw_path.startswith(b"/v1/"):
            await self.inner(scope, receive, send_with_id)
            return
        core = self.core
        inflight = core.metrics.inflight
        inflight.inc()
        try:
            route = _PROXIED.get(scope["raw_path"]) if scope["method"] == "POST" else None
            # The request's SERVER span (a no-op object when tracing is off), current for all it does.
            with self.core.tracing.server(scope, scope["path"] if route is not None else None):
                try:
                    if route is None:
                        await self.inner(scope, receive, send_with_id)
                        return
                    response = await self.proxy.handle(route, scope, receive)
                    if isinstance(response, ProxyResponse):
                        # The relay adds x-request-id itself: its chunks go to the server directly.
                        state[ECHO_ID] = rid
                        try:
                            await response(scope, receive, send)
                        finally:
                            if response.ex.status:
                                state["response_status"] = response.ex.status  # for the SERVER span
                    else:
                        await response(scope, receive, send_with_id)
                finally:
                    if "exchange" not in state:
                        # Answered before the pipeline had an exchange (a bad body, an unknown route, state
                        # CRUD): the pipeline's metrics and access line never saw it. Inside the span, so
                        # the line carries its trace id.
                        status = status or 499
                        core.metrics.unexchanged(_route_label(raw_path), status, time.perf_counter() - started)
                        core.access.refused(internal, state["client_request_id"], scope["method"], scope["path"],
                                            status, started, scope["headers"])
        finally:
            inflight.dec()


_ROUTE_LABELS = ("chat/completions", "completions", "embeddings", "models", "responses", "conversations")


def _route_label(raw_path: bytes) -> str:
    """A bounded route label for a /v1/ path (ids in the path never become label values)."""
    path = raw_path[4:].decode("latin-1")
    for label in _ROUTE_LABELS:
        if path == label or path.startswith(label + "/"):
            return label
    return "other"


class OpsRoutes:
    """Health, readiness, metrics, the model list and the admin view."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def list_models(self, request: Request) -> Response:
        created = int(self.core.started_at)
        data = [{"id": m, "object": "model", "created": created, "owned_by": "gravity"}
                for m in sorted(self.core.datastore.served_models())]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ok, missing = self.core.ready()
        status = "draining" if self.core.drain.draining else ("ready" if ok else "not_ready")
        body = {"status": status, "models_without_healthy_backend": missing}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        if self.core.cfg.server.metrics_auth == "admin":
            try:
                await self.core.admission.authorize_admin(request.headers)
            except Exception as exc:  # noqa: BLE001 - the one error mapping answers any auth failure
                return error_response(exc)
        return Response(self.core.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def admin_backends(self, request: Request) -> Response:
        try:
            # Backend URLs and load are for operators: an admin key once API keys are on.
            await self.core.admission.authorize_admin(request.headers)
        except Exception as exc:  # noqa: BLE001 - the one error mapping answers any auth failure
            return error_response(exc)
        described = self.core.datastore.describe()
        for name, entry in described.items():
            entry["circuit"] = self.core.circuits.state(name)
        return Response(orjson.dumps(described, default=str), media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown request URL: {request.method} {request.url.path}."))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."))
    return error_response(GatewayError(str(exc.detail), status=exc.status_code, type="invalid_request_error",
                                       code=None))


async def _server_error(request: Request, exc: Exception) -> Response:
    if not is_expected(exc):
        log.exception("unhandled error", exc_info=exc)
    return error_response(exc)


def create_app(cfg: GatewayConfig, core: Core | None = None) -> GatewayApp:
    core = core or build_core(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await core.start()
        try:
            yield
        finally:
            await core.stop()

    proxy = ProxyRoutes(core.pipeline, core.dispatcher, core.metrics, core.outcomes, cfg.server, core.trusted_proxies)
    ops = OpsRoutes(core)
    deps = StateDeps(store=core.store, pipeline=core.pipeline, dispatcher=core.dispatcher, metrics=core.metrics,
                     identify=core.admission.identify, state=cfg.state, server=cfg.server,
                     trusted=core.trusted_proxies)

    async def proxied(request: Request) -> Any:
        return await proxy.handle(_PROXIED[request.scope["raw_path"]], request.scope, request.receive)

    routes = [
        Route("/v1/chat/completions", proxied, methods=["POST"]),
        Route("/v1/completions", proxied, methods=["POST"]),
        Route("/v1/embeddings", proxied, methods=["POST"]),
        Route("/v1/models", ops.list_models, methods=["GET"]),
        Route("/health", ops.health, methods=["GET"]),
        Route("/ready", ops.ready, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/admin/backends", ops.admin_backends, methods=["GET"]),
        *kv_routes(core),
        *state_routes(deps),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    limits = cfg.server.limits
    guard = ConnectionGuard(ConnectionLimits(
        header_timeout_s=limits.header_timeout_s, idle_timeout_s=limits.idle_timeout_s,
        max_connections=limits.max_connections, max_head_bytes=limits.max_head_bytes))
    return GatewayApp(core, app, proxy, guard)
