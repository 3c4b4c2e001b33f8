"""Answering the client for the Dispatcher: the response head, a whole body, stream events, errors.

`Relay` holds what one request's answer needs (its exchange, the ASGI `send`, whether the response
has started); the Dispatcher's attempt loop (gateway/dispatcher.py) builds on it.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from gateway.errors import error_response, is_expected, to_gateway_error
from gateway.exchange import Exchange
from gateway.logs import OutcomeLog
from gateway.resume import ResumeState
from gateway.sse import EventSplitter, only_null_usage, usage_of
from gateway.telemetry.tracing import NO_ATTEMPT, AttemptSpan
from gateway.transport import UpstreamResponse
from gateway.upstream import forwardable_response_headers

log = logging.getLogger("gravity.dispatch")

__all__ = ["DONE", "ERROR_EVENT", "STREAM_HEADERS", "Relay", "Send"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

STREAM_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                  "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"
ERROR_EVENT = b'data: {"error"'


class Relay:
    """One request's answer as the client sees it."""

    def __init__(self, ex: Exchange, send: Send, *, debug: bool, outcomes: OutcomeLog,
                 settle: Callable[[Exchange], Awaitable[None]] | None, echo_id: bytes | None = None) -> None:
        self.ex, self.send = ex, send
        self._echo_id = echo_id
        """The x-request-id this answer carries, when the edge leaves adding it to the relay (so no
        wrapper sits between the relay and the server for every chunk)."""
        self._debug = debug
        self._outcomes = outcomes
        self._settle = settle
        self.started = False
        """The client's response has begun (status line sent)."""
        self.resp: UpstreamResponse | None = None
        self.state: ResumeState | None = None
        self.error_event = False
        self.span: AttemptSpan | Any = NO_ATTEMPT
        """The current attempt's CLIENT span (ended by whatever ends the attempt)."""

    def _headers(self, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
        ex = self.ex
        headers = {**extra, **ex.response_headers}
        if not self._debug:
            headers.pop("x-gravity-attempts", None)
        elif ex.backend:
            headers["x-gravity-backend"] = ex.backend
            if ex.decision is not None:
                headers["x-gravity-route"] = ex.decision.header()
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if self._echo_id is not None:
            out.append((b"x-request-id", self._echo_id))
        return out

    async def _start(self, status: int, extra: dict[str, str]) -> None:
        self.started = True
        self.ex.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": self._headers(extra)})

    async def _relay_whole(self, body: bytes) -> None:
        ex, resp = self.ex, self.resp
        assert resp is not None
        # One parse of the answer, shared by the usage count and the attempt span (and skipped when
        # neither needs it: no usage in the body and the span is not recording).
        payload = _json_object(body) if self.span.recording or b'"usage"' in body else None
        if payload is not None:
            usage = payload.get("usage")
            if isinstance(usage, dict):
                ex.usage = usage
            self.span.answer(payload)
        headers = forwardable_response_headers(resp.headers)
        headers["content-length"] = str(len(body))
        await self._start(resp.status, headers)
        ex.outcome = "ok"
        await self._last(body)
        self._attempt_done()

    def _pass(self, splitter: EventSplitter, chunk: bytes, state: ResumeState | None, resumed: bool) -> bytes:
        """What the client gets of one upstream chunk. A chunk of whole events that carries no usage
        and no error event, on a first attempt with no span recording, goes on as it came: no split,
        no parse (the usage chunk, error events, partial events and continuations take `_filter`)."""
        if not resumed and chunk.endswith(b"\n\n") and not splitter.buf and b'{"error"' not in chunk \
                and (b'"usage"' not in chunk or only_null_usage(chunk)) and not self.span.recording:
            if state is not None:
                state.events.append(chunk)
            return chunk
        events = splitter.feed(chunk)
        if not events:
            return b""
        if self.span.recording:
            self.span.events(events)
        return self._filter(events, state, resumed)

    def _filter(self, events: list[bytes], state: ResumeState | None, resumed: bool) -> bytes:
        ex = self.ex
        out = []
        for event in events:
            if event.startswith(ERROR_EVENT):
                # vLLM reports an engine failure inside the stream; the next endpoint may continue it.
                self.error_event = True
                break
            if state is not None:
                state.events.append(event)
                if resumed:
                    rewritten = state.rewrite(event)
                    if rewritten is None:
                        continue
                    event = rewritten
            usage, usage_only = usage_of(event)
            if usage is not None:
                ex.usage = usage
            if usage_only and not ex.client_wants_usage:
                continue
            out.append(event)
        return b"".join(out)

    async def _finish_owed_nothing(self) -> None:
        """Every token was sent before the backend went silent: end cleanly, with the usage chunk the
        client asked for (it never came) and [DONE], instead of cutting the stream short. Nothing is
        sent to the endpoint the plan chose: close() frees it if it was a half-open probe."""
        ex, state = self.ex, self.state
        assert state is not None
        usage, chunk = state.closing_usage(ex.routing.prompt_tokens)
        ex.usage = usage
        ex.outcome = "ok"
        await self._last((chunk if ex.client_wants_usage else b"") + DONE)

    async def _finish_stream(self) -> None:
        self.ex.outcome = "ok"
        await self._last(b"")
        self._attempt_done()

    def _attempt_done(self) -> None:
        if self.span is not NO_ATTEMPT:
            self.span.done(self.ex)
            self.span = NO_ATTEMPT

    async def _last(self, body: bytes) -> None:
        """The final body message, after the budget is settled (the outcome and usage are known)."""
        ex = self.ex
        if self._settle is not None:
            await self._settle(ex)
        ex.finished_sending = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_error(self, err: BaseException, outcome: str = "error") -> None:
        ex = self.ex
        gerr = to_gateway_error(err)
        if not is_expected(err):
            log.exception("request %s failed", ex.request_id, exc_info=err)
        elif gerr.status >= 500:
            self._outcomes.note(f"failed:{gerr.code}", "requests failed: %d %s (%s)", gerr.status, gerr.code,
                                  gerr.message)
        ex.outcome = outcome
        ex.status = gerr.status
        headers = dict(ex.response_headers)
        if not self._debug:
            headers.pop("x-gravity-attempts", None)
        elif ex.backend:
            headers["x-gravity-backend"] = ex.backend
        if self._echo_id is not None:
            headers["x-request-id"] = self._echo_id.decode("latin-1")
        response = error_response(gerr, headers)
        if self._settle is not None:
            await self._settle(ex)
        ex.finished_sending = True
        self.started = True
        await response({"type": "http"}, _never_receive, self.send)


async def _never_receive() -> MutableMapping[str, Any]:
    raise RuntimeError("error responses do not read the request")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None
