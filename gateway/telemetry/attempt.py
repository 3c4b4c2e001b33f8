"""The CLIENT span of one upstream attempt, `{gen_ai.operation.name} {gen_ai.request.model}`, with the
GenAI attributes of the answer (ids, finish reasons, usage, time to first chunk)."""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.sse import event_json
from gateway.telemetry import names as N
from gateway.telemetry.otlp import Shape
from gateway.telemetry.spans import mark_error

if TYPE_CHECKING:
    from gateway.exchange import Exchange

__all__ = ["NO_ATTEMPT", "AttemptSpan", "input_messages"]

_IDENTITY = Shape(N.GEN_AI_RESPONSE_ID, N.GEN_AI_RESPONSE_MODEL)
_OUTCOME = Shape(N.GEN_AI_RESPONSE_FINISH_REASONS, N.GEN_AI_USAGE_INPUT_TOKENS, N.GEN_AI_USAGE_OUTPUT_TOKENS,
                 N.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, N.HTTP_RESPONSE_STATUS_CODE)
_FAILED = Shape(N.ATTEMPT_FAILURE, N.HTTP_RESPONSE_STATUS_CODE, cached=True)


class _NoAttempt:
    __slots__ = ()
    recording = False

    def first_chunk(self) -> None:
        pass

    def events(self, events: list[bytes]) -> None:
        pass

    def answer(self, payload: dict[str, Any]) -> None:
        pass

    def failed(self, failure: str, status: int | None = None) -> None:
        pass

    def done(self, ex: Exchange) -> None:
        pass

    def cancelled(self) -> None:
        pass


NO_ATTEMPT = _NoAttempt()


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class AttemptSpan:
    """One upstream attempt as a CLIENT span `{gen_ai.operation.name} {gen_ai.request.model}`.

    Ends exactly once: `failed`, `done`, or `cancelled` (the dispatcher calls that for whatever is still
    open when it stops, so a client disconnect or a cancelled stream ends the span too)."""

    __slots__ = ("_finish", "_identity", "_started", "_text", "recording", "span")

    def __init__(self, span: Any, capture: bool) -> None:
        self.span = span
        self.recording = span.is_recording()
        self._started = time.perf_counter()
        self._identity = False
        self._finish: list[str] = []
        self._text: list[str] | None = [] if capture else None

    def first_chunk(self) -> None:
        if self.recording:
            self.span.set_attribute(N.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, time.perf_counter() - self._started)

    def events(self, events: list[bytes]) -> None:
        """Streamed events as relayed: the response's id and model from the first, finish reasons as they come."""
        if not self.recording:
            return
        capture = self._text is not None
        for event in events:
            if not self._identity or capture or b'"finish_reason":"' in event \
                    or b'"finish_reason": "' in event:
                payload = event_json(event)
                if not isinstance(payload, dict):
                    continue
                if not self._identity:
                    self._identify(payload)
                self._choices(payload, "delta")

    def answer(self, payload: dict[str, Any]) -> None:
        """A whole (non-streamed) answer, parsed once by the relay."""
        if not self.recording:
            return
        self._identify(payload)
        self._choices(payload, "message")

    def _choices(self, payload: dict[str, Any], part: str) -> None:
        """Finish reasons, and the text when captured, of an answer's (`message`) or a chunk's (`delta`)
        choices; completions carry `text` instead."""
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finish.append(reason)
            if self._text is not None:
                inner = choice.get(part)
                piece = inner.get("content") if isinstance(inner, dict) else choice.get("text")
                if isinstance(piece, str):
                    self._text.append(piece)

    def _identify(self, payload: dict[str, Any]) -> None:
        self._identity = True
        rid, model = payload.get("id"), payload.get("model")
        self.span.record(_IDENTITY, (rid if isinstance(rid, str) else None,
                                     model if isinstance(model, str) else None))

    def failed(self, failure: str, status: int | None = None) -> None:
        span = self.span
        span.record(_FAILED, (failure, status))
        mark_error(span, str(status) if status is not None else failure)
        span.end()

    def done(self, ex: Exchange) -> None:
        span = self.span
        if self.recording:
            usage: Mapping[str, Any] = ex.usage or {}
            details = usage.get("prompt_tokens_details")
            cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
            span.record(_OUTCOME, (tuple(self._finish) or None, _int(usage.get("prompt_tokens")),
                                   _int(usage.get("completion_tokens")), cached, ex.status or None))
            if self._text is not None:
                span.set_attribute(N.GEN_AI_OUTPUT_MESSAGES, orjson.dumps([
                    {"role": "assistant", "parts": [{"type": "text", "content": "".join(self._text)}],
                     "finish_reason": self._finish[0] if self._finish else "error"}]).decode())
        if ex.status >= 400:
            mark_error(span, str(ex.status))
        span.end()

    def cancelled(self) -> None:
        if self.recording and not self._finish:
            self.span.set_attribute(N.GEN_AI_RESPONSE_FINISH_REASONS, ["error"])
        mark_error(self.span, "cancelled", "the request ended before this attempt did")
        self.span.end()


def input_messages(body: Mapping[str, Any]) -> str:
    """The request's messages in the conventions' shape (opt-in only)."""
    out = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else orjson.dumps(content).decode()
                out.append({"role": m.get("role"), "parts": [{"type": "text", "content": text}]})
    else:
        prompt = body.get("prompt") if "prompt" in body else body.get("input")
        out.append({"role": "user", "parts": [{"type": "text", "content": prompt if isinstance(prompt, str)
                                               else orjson.dumps(prompt).decode()}]})
    return orjson.dumps(out).decode()
