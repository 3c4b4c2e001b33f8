"""The OpenTelemetry SDK behind the `Recorder` shape: for gRPC export and `processor: thread`.

Its spans cost several times the gateway's own (docs/decisions/0004-span-recorder.md), so this path is
taken only where the SDK's exporter is needed: OTLP over gRPC (the otlp-grpc extra), or the SDK's
BatchSpanProcessor asked for by name. Drops of its full queue and failed exports are counted as the
event-loop processor's are.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from gateway.telemetry.config import BatchConfig
from gateway.telemetry.export import ExportCounters
from gateway.telemetry.otlp import Shape
from gateway.telemetry.spans import RemoteParent, SpanScope

__all__ = ["CountingExporter", "CountingThreadProcessor", "SdkRecorder"]

_KINDS = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT}


class _SdkSpan(SpanScope):
    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    @property
    def _ctx(self) -> SpanContext:
        return self.span.get_span_context()

    @property
    def trace_id(self) -> bytes:
        return self._ctx.trace_id.to_bytes(16, "big")

    @property
    def span_id(self) -> bytes:
        return self._ctx.span_id.to_bytes(8, "big")

    @property
    def sampled(self) -> bool:
        return self._ctx.trace_flags.sampled

    @property
    def tracestate(self) -> str | None:
        return self._ctx.trace_state.to_header() or None

    def is_recording(self) -> bool:
        return self.span.is_recording()

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.span.set_attributes(attributes)

    def record(self, shape: Shape, values: tuple[Any, ...]) -> None:
        self.span.set_attributes(shape.pairs(values))

    def set_error(self, message: str | None = None) -> None:
        self.span.set_status(Status(StatusCode.ERROR, message))

    def update_name(self, name: str) -> None:
        self.span.update_name(name)

    def end(self) -> None:
        self.span.end()


    def traceparent(self) -> str:
        c = self._ctx
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags) & 0x01:02x}"


class SdkRecorder:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start(self, name: str, kind: int, attributes: dict[str, Any] | None, parent: Any) -> _SdkSpan:
        if isinstance(parent, _SdkSpan):
            ctx = trace.set_span_in_context(parent.span)
        elif isinstance(parent, RemoteParent):
            remote = SpanContext(int.from_bytes(parent.trace_id, "big"), int.from_bytes(parent.span_id, "big"),
                                 is_remote=True, trace_flags=TraceFlags(parent.flags & 0x01),
                                 trace_state=TraceState.from_header([parent.tracestate]) if parent.tracestate
                                 else None)
            ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        else:
            ctx = Context()  # a root: never the process-wide OpenTelemetry context
        return _SdkSpan(self._tracer.start_span(name, context=ctx, kind=_KINDS[kind], attributes=attributes))


class CountingExporter(SpanExporter):
    """An SDK exporter whose results are counted (the `thread` processor)."""

    def __init__(self, inner: SpanExporter, counters: ExportCounters) -> None:
        self._inner = inner
        self.counters = counters

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not kill the worker thread
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.counters.ok(len(spans))
        else:
            self.counters.drop(len(spans), "export_failed")
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingThreadProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, with the spans its full queue overwrites counted as dropped."""

    def __init__(self, exporter: SpanExporter, batch: BatchConfig, counters: ExportCounters) -> None:
        self._bsp = BatchSpanProcessor(CountingExporter(exporter, counters), max_queue_size=batch.max_queue_size,
                                       schedule_delay_millis=batch.schedule_delay_ms,
                                       max_export_batch_size=batch.max_export_batch_size,
                                       export_timeout_millis=batch.export_timeout_ms)
        self._queue: Any = self._bsp._batch_processor._queue  # a deque with maxlen: full means overwrite
        self._max = batch.max_queue_size
        self.counters = counters

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._max:
            self.counters.drop(1, "queue_full")
        self._bsp.on_end(span)

    def shutdown(self) -> None:
        self._bsp.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._bsp.force_flush(timeout_millis)

    async def start(self) -> None:
        pass

    async def flush(self) -> None:
        await asyncio.to_thread(self._bsp.force_flush)

    async def stop(self) -> None:
        # The SDK joins its worker thread (up to the export timeout): not on the loop.
        await asyncio.to_thread(self._bsp.shutdown)
