"""The streaming proxy: send an exchange to the best reachable backend and relay its answer.

Bytes pass through as they arrive; the body is raced against client disconnect so an
abandoned request closes its upstream at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway.errors import (
    BadGateway,
    GatewayError,
    UpstreamTimeout,
    error_response,
    is_expected,
    normalise_upstream_error,
    to_gateway_error,
)
from gateway.exchange import Exchange
from gateway.sse import EventSplitter, usage_of
from gateway.upstream import forwardable_response_headers

if TYPE_CHECKING:
    from gateway.services import Gateway

log = logging.getLogger("gravity.proxy")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_STREAM_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                   "x-accel-buffering": "no"}


class ProxyResponse:
    """An ASGI response that performs the upstream call itself, so it can watch for disconnects."""

    def __init__(self, gw: Gateway, ex: Exchange) -> None:
        self.gw = gw
        self.ex = ex
        self._started = False
        self._finished = False
        """Set before the last body message: uvicorn reports "disconnect" once a response is complete."""

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        # The work runs in the request's own task; one watcher task cancels it if the client
        # leaves, which also closes the upstream connection (aiohttp releases it on cancel).
        task = asyncio.current_task()
        assert task is not None
        left = False

        async def watch() -> None:
            nonlocal left
            await _wait_disconnect(receive)
            if not self._finished:
                left = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._serve(send)
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
            self.ex.outcome = "client_disconnect"
            self.gw.metrics.client_disconnects.labels(self.ex.route).inc()
        finally:
            self._finished = True
            watcher.cancel()
            await self.gw.finish(self.ex)

    async def _serve(self, send: Send) -> None:
        try:
            resp = await self._connect()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one OpenAI-shaped answer
            await self._send_error(send, exc)
            return
        try:
            if resp.status >= 400:
                body = await resp.read()
                if resp.status in (401, 403):
                    self.gw.outcomes.note(
                        f"upstream-auth:{self.ex.backend}", "backend %s refused the gateway's credentials "
                        "(HTTP %d): check its api_key; an operator problem, clients get 502 upstream_auth_error",
                        self.ex.backend, resp.status)
                await self._send_error(send, normalise_upstream_error(resp.status, body,
                                                                      resp.headers.get("retry-after")))
                self.ex.outcome = "upstream_error"
            elif self.ex.stream and resp.content_type == "text/event-stream":
                await self._relay_stream(send, resp)
            else:
                await self._relay_whole(send, resp)
        except TimeoutError:
            await self._fail(send, UpstreamTimeout("The backend did not answer in time."))
        except aiohttp.ClientError as exc:
            await self._fail(send, BadGateway(f"The backend connection failed: {type(exc).__name__}."))
        finally:
            resp.release()

    async def _connect(self) -> aiohttp.ClientResponse:
        """Try the ranked candidates in order while they cannot be reached at all."""
        gw, ex = self.gw, self.ex
        assert ex.decision is not None
        payload = ex.upstream_body()
        last: BaseException | None = None
        for cand in ex.decision.ranked[: gw.cfg.server.max_attempts]:
            target = gw.targets[cand.endpoint]
            headers = dict(ex.forward_headers)
            headers["content-type"] = "application/json"
            if target.auth_header:
                headers["authorization"] = target.auth_header
            ex.attempts += 1
            # Count only the prompt tokens this endpoint must prefill (its cache holds the rest).
            ticket = gw.datastore.begin(cand.endpoint, cand.uncached_tokens, ex.routing.max_tokens)
            # Teach the prefix index now, not when the backend answers (a non-streamed answer comes
            # back only at the end): a burst sharing this prefix must see where it went.
            gw.scheduler.observe(ex.routing, cand.endpoint)
            try:
                resp = await gw.upstream.session.post(f"{target.api_base}/{ex.route}", data=payload,
                                                      headers=headers)
            except _CONNECT_ERRORS as exc:
                gw.datastore.end(ticket)
                gw.metrics.upstream_errors.labels(cand.endpoint, "connect").inc()
                gw.datastore.set_healthy(cand.endpoint, False, f"connect failed: {type(exc).__name__}")
                last = exc
                continue
            except TimeoutError:
                gw.datastore.end(ticket)
                gw.metrics.upstream_errors.labels(cand.endpoint, "timeout").inc()
                raise UpstreamTimeout("The backend did not answer in time.") from None
            except BaseException:
                gw.datastore.end(ticket)
                raise
            ex.extras["inflight_ticket"] = ticket
            ex.backend = cand.endpoint
            await gw.picked(ex)
            return resp
        raise BadGateway(f"No backend for model '{ex.model}' could be reached"
                         f"{f' ({type(last).__name__})' if last else ''}.", code="backend_unreachable")

    def _headers(self, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
        ex = self.ex
        headers = {**extra, **ex.response_headers}
        if self.gw.cfg.server.debug_headers and ex.backend:
            headers["x-gravity-backend"] = ex.backend
            if ex.decision is not None:
                headers["x-gravity-route"] = ex.decision.header()
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def _start(self, send: Send, status: int, extra: dict[str, str]) -> None:
        self._started = True
        self.ex.status = status
        await send({"type": "http.response.start", "status": status, "headers": self._headers(extra)})

    async def _relay_whole(self, send: Send, resp: aiohttp.ClientResponse) -> None:
        body = await resp.read()
        if b'"usage"' in body:
            try:
                usage = orjson.loads(body).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                usage = None
            if isinstance(usage, dict):
                self.ex.usage = usage
        headers = forwardable_response_headers(resp.headers)
        headers["content-length"] = str(len(body))
        await self._start(send, resp.status, headers)
        self._finished = True
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.ex.outcome = "ok"

    async def _relay_stream(self, send: Send, resp: aiohttp.ClientResponse) -> None:
        ex = self.ex
        await self._start(send, resp.status, dict(_STREAM_HEADERS))
        splitter = EventSplitter()
        async for chunk in resp.content.iter_any():
            if ex.first_chunk_at is None:
                ex.first_chunk_at = time.perf_counter()
                # Prefill is over: the endpoint's queued-prefill load drops now, not at the end.
                self.gw.datastore.first_token(ex.extras["inflight_ticket"])
            events = splitter.feed(chunk)
            if not events:
                continue
            out = []
            for event in events:
                usage, usage_only = usage_of(event)
                if usage is not None:
                    ex.usage = usage
                if usage_only and not ex.client_wants_usage:
                    continue
                out.append(event)
            if out:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        rest = splitter.rest()
        self._finished = True
        await send({"type": "http.response.body", "body": rest, "more_body": False})
        ex.outcome = "ok"

    async def _send_error(self, send: Send, exc: BaseException) -> None:
        err = to_gateway_error(exc)
        if not is_expected(exc):
            log.exception("request %s failed", self.ex.request_id, exc_info=exc)
        elif err.status >= 500:
            self.gw.outcomes.note(f"failed:{err.code}", "requests failed: %d %s (%s)", err.status, err.code,
                                     err.message)
        self.ex.outcome = "error"
        self.ex.status = err.status
        response = error_response(err, self.ex.response_headers)
        if self.gw.cfg.server.debug_headers and self.ex.backend:
            response.headers["x-gravity-backend"] = self.ex.backend
        self._finished = True
        await response({"type": "http"}, _never_receive, send)
        self._started = True

    async def _fail(self, send: Send, err: GatewayError) -> None:
        """An upstream failure: a plain error before the response started, an SSE error event after."""
        if self.ex.backend:
            self.gw.metrics.upstream_errors.labels(self.ex.backend, err.code or "error").inc()
        if not self._started:
            await self._send_error(send, err)
            return
        self.ex.outcome = "upstream_error"
        event = b"data: " + orjson.dumps(err.body()) + b"\n\n"
        self._finished = True
        await send({"type": "http.response.body", "body": event, "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _never_receive() -> MutableMapping[str, Any]:
    raise RuntimeError("error responses do not read the request")
