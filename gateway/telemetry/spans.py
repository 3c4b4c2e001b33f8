"""The gateway's own span recorder: W3C trace context, the standard samplers, and spans as small objects.

The OpenTelemetry SDK's spans cost more than the whole rest of a request here (docs/decisions/
0004-span-recorder.md), so the default path records spans itself with exactly what OTLP needs and
`otlp.py` encodes them. The SDK stays behind the same `Recorder` shape for gRPC (`sdk.py`).
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any, Protocol, Self

from gateway.telemetry.names import ERROR_TYPE
from gateway.telemetry.otlp import Shape, attribute

__all__ = [
    "CLIENT",
    "INTERNAL",
    "SERVER",
    "LiteRecorder",
    "LiteSpan",
    "Recorder",
    "RemoteParent",
    "Sampler",
    "error_type",
    "mark_error",
    "parse_traceparent",
    "sampler",
]

INTERNAL, SERVER, CLIENT = 1, 2, 3
"""OTLP SpanKind values."""
UNSET, OK, ERROR = 0, 1, 2
"""OTLP status codes."""

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class RemoteParent:
    """The client's span, from its traceparent/tracestate headers."""

    __slots__ = ("flags", "span_id", "trace_id", "tracestate")
    remote = True

    def __init__(self, trace_id: bytes, span_id: bytes, flags: int, tracestate: str | None) -> None:
        self.trace_id, self.span_id, self.flags, self.tracestate = trace_id, span_id, flags, tracestate

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(traceparent: str, tracestate: str | None = None) -> RemoteParent | None:
    """A valid W3C traceparent (version 00, or a later one read as 00), else None: the request starts a trace."""
    m = _TRACEPARENT.match(traceparent.strip().lower())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return RemoteParent(bytes.fromhex(trace_id), bytes.fromhex(span_id), int(flags, 16),
                        tracestate.strip() if tracestate and tracestate.strip() else None)


Sampler = Callable[["LiteSpan | RemoteParent | _Unsampled | None", bytes], bool]


def sampler(name: str, ratio: float) -> Sampler:
    """The OTEL_TRACES_SAMPLER values, as the SDKs decide them (ratio on the trace id's low 8 bytes)."""
    bound = round(max(0.0, min(1.0, ratio)) * (1 << 64))

    def by_ratio(trace_id: bytes) -> bool:
        return int.from_bytes(trace_id[8:], "big") < bound

    root: Callable[[bytes], bool] = {
        "always_on": lambda _t: True, "always_off": lambda _t: False, "traceidratio": by_ratio,
        "parentbased_always_on": lambda _t: True, "parentbased_always_off": lambda _t: False,
        "parentbased_traceidratio": by_ratio}[name]
    if not name.startswith("parentbased_"):
        return lambda parent, trace_id: root(trace_id)

    def parent_based(parent: Any, trace_id: bytes) -> bool:
        return root(trace_id) if parent is None else bool(parent.sampled)
    return parent_based


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for what went wrong: the OpenAI error code when there is one, else the class."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return type(exc).__qualname__


def mark_error(span: Any, kind: str, message: str | None = None) -> None:
    span.set_attribute(ERROR_TYPE, kind)
    span.set_error(message)


class SpanScope:
    """A span as a context manager, shared by the recorder's spans and the SDK's: it ends at the
    block's end, an exception marking it failed (`error.type`)."""

    __slots__ = ()

    def end(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            mark_error(self, error_type(exc) if not isinstance(exc, BaseExceptionGroup) else "error")
        self.end()


class LiteSpan(SpanScope):
    """A recording span: what OTLP carries of it, its attributes already encoded (otlp.py), and the
    queue it goes to when it ends. As a context manager it ends at the block's end, an exception
    marking it failed."""

    __slots__ = ("_sink", "attrs", "end_ns", "kind", "name", "parent_id", "span_id", "start_ns",
                 "status_code", "status_message", "trace_id", "tracestate")
    sampled = True
    flags = 0x01

    def __init__(self, name: str, kind: int, trace_id: bytes, span_id: bytes, parent_id: bytes,
                 tracestate: str | None, sink: Callable[[LiteSpan], None]) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.tracestate = tracestate
        self.attrs: list[bytes] = []
        """Encoded `Span.attributes` fields."""
        self.start_ns = time_ns()
        self.end_ns = 0
        self.status_code = UNSET
        self.status_message: str | None = None
        self._sink = sink

    def is_recording(self) -> bool:
        return self.end_ns == 0

    def record(self, shape: Shape, values: tuple[Any, ...]) -> None:
        self.attrs.append(shape.encode(values))

    def set_attribute(self, key: str, value: Any) -> None:
        self.attrs.append(attribute(key, value))

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attrs += [attribute(k, v) for k, v in attributes.items()]

    def set_error(self, message: str | None = None) -> None:
        self.status_code = ERROR
        self.status_message = message

    def update_name(self, name: str) -> None:
        self.name = name

    def end(self) -> None:
        if self.end_ns == 0:
            self.end_ns = time_ns()
            self._sink(self)

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"



class _Unsampled:
    """A span the sampler left out: its ids still propagate (flag 00), nothing is recorded."""

    __slots__ = ("span_id", "trace_id", "tracestate")
    sampled = False
    flags = 0x00

    def __init__(self, trace_id: bytes, span_id: bytes, tracestate: str | None) -> None:
        self.trace_id, self.span_id, self.tracestate = trace_id, span_id, tracestate

    def is_recording(self) -> bool:
        return False

    def record(self, shape: Shape, values: tuple[Any, ...]) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_error(self, message: str | None = None) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def end(self) -> None:
        pass

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-00"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Recorder(Protocol):
    def start(self, name: str, kind: int, attributes: dict[str, Any] | None, parent: Any) -> Any:
        """A started span (recording or not) under `parent`: a span of this recorder, a RemoteParent, or None."""
        ...


class LiteRecorder:
    def __init__(self, sample: Sampler, sink: Callable[[LiteSpan], None]) -> None:
        self._sample = sample
        self._sink = sink
        self._bits = random.SystemRandom().getrandbits(64)
        self._rng = random.Random(self._bits)
        """Ids need uniqueness, not secrecy: a seeded PRNG, 10x cheaper than os.urandom per id."""

    def start(self, name: str, kind: int, attributes: dict[str, Any] | None, parent: Any) -> LiteSpan | _Unsampled:
        rng = self._rng
        span_id = (rng.getrandbits(64) or 1).to_bytes(8, "big")  # all-zero ids are invalid (W3C)
        if parent is None:
            trace_id = (rng.getrandbits(128) or 1).to_bytes(16, "big")
            parent_id, state = b"", None
        else:
            trace_id, parent_id, state = parent.trace_id, parent.span_id, parent.tracestate
        if not self._sample(parent, trace_id):
            return _Unsampled(trace_id, span_id, state)
        span = LiteSpan(name, kind, trace_id, span_id, parent_id, state, self._sink)
        if attributes:
            span.set_attributes(attributes)
        return span
