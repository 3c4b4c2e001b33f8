"""The proxied OpenAI routes: parse, admit, route, then let the Dispatcher answer while watching the client.

The body is raced against client disconnect, so an abandoned request closes its upstream at once,
and the pipeline finishes every exchange exactly once (budgets settled or refunded).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response

from gateway.config import ServerConfig
from gateway.dispatcher import Dispatcher
from gateway.errors import error_response, is_expected, to_gateway_error
from gateway.exchange import Exchange
from gateway.httpserver import WATCH_DISCONNECT
from gateway.logs import OutcomeLog
from gateway.metrics import UNROUTED, GatewayMetrics
from gateway.openai_requests import ClientGone, parse_body, read_body
from gateway.pipeline import Pipeline
from gateway.upstream import TrustedProxies, scope_headers

log = logging.getLogger("gravity.proxy")

__all__ = ["ECHO_ID", "ProxyResponse", "ProxyRoutes", "Receive", "Send"]

ECHO_ID = "echo_request_id"
"""scope["state"] key: the x-request-id the edge wants on the answer when it hands the ProxyResponse
the server's own `send` (the relay adds the header; no wrapper per chunk)."""

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ProxyResponse:
    """An ASGI response that runs the dispatch itself, so it can watch for the client leaving."""

    def __init__(self, pipeline: Pipeline, dispatcher: Dispatcher, metrics: GatewayMetrics, ex: Exchange) -> None:
        self.pipeline = pipeline
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.ex = ex

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        # The work runs in the request's own task, cancelled if the client leaves, which also closes the
        # upstream connection. The gateway's own server calls back on a disconnect; under another
        # server one watcher task waits in receive() for it.
        task = asyncio.current_task()
        assert task is not None
        ex = self.ex
        left = False

        def gone() -> None:
            nonlocal left
            # uvicorn reports "disconnect" once a response is complete: that is not the client leaving.
            if not ex.finished_sending and not left:
                left = True
                task.cancel()

        async def watch() -> None:
            await _wait_disconnect(receive)
            gone()

        extensions = scope.get("extensions")
        callback = extensions.get(WATCH_DISCONNECT) if extensions else None
        watcher = None
        if callback is not None:
            callback(gone)
        else:
            watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.dispatcher.run(ex, send, scope["state"].get(ECHO_ID))
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
            ex.outcome = "client_disconnect"
            self.metrics.client_disconnects.labels(ex.route).inc()
        finally:
            if watcher is not None:
                watcher.cancel()
            elif callback is not None:
                callback(None)
            await self.pipeline.finish(ex)


class ProxyRoutes:
    """`POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` (GatewayApp calls them directly)."""

    def __init__(self, pipeline: Pipeline, dispatcher: Dispatcher, metrics: GatewayMetrics, outcomes: OutcomeLog,
                 server: ServerConfig, trusted: TrustedProxies) -> None:
        self.pipeline = pipeline
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.outcomes = outcomes
        self.server = server
        self.trusted = trusted

    async def handle(self, route: str, scope: MutableMapping[str, Any], receive: Receive) -> Response | ProxyResponse:
        """Parse, admit and route; the returned ProxyResponse performs the upstream call."""
        model = "unknown"
        ex = None
        state = scope["state"]
        try:
            raw = await read_body(scope, receive, self.server.max_body_bytes, self.server.limits.body_timeout_s)
            parsed = parse_body(route, raw)
            model = parsed.model
            headers = Headers(scope=scope)
            ex = self.pipeline.exchange(route, parsed, raw, headers, state["request_id"],
                                        scope_headers(scope, self.trusted), state.get("client_request_id"))
            state["exchange"] = ex  # its access-log line comes from the pipeline (GatewayApp writes none)
            await self.pipeline.prepare(ex, headers)
        except Exception as exc:
            err = to_gateway_error(exc)
            if not is_expected(exc) and not isinstance(exc, ClientGone):
                log.exception("request %s failed before dispatch", state["request_id"])
            elif err.status >= 500:
                self.outcomes.note(f"refused:{err.code}", "requests refused before dispatch: %d %s (%s)",
                                   err.status, err.code, err.message)
            if err.code in ("model_not_found", "no_healthy_backend"):
                served = model if err.code == "no_healthy_backend" else UNROUTED
                self.metrics.routing_errors.labels(served, err.code or "").inc()
            if ex is not None:
                ex.status = err.status
                return error_response(err, ex.response_headers)
            return error_response(err)
        return ProxyResponse(self.pipeline, self.dispatcher, self.metrics, ex)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
