"""Getting finished spans to the collector without ever making a request wait for it.

`LoopSpanProcessor` (the default) batches on the event loop and posts OTLP/HTTP protobuf with aiohttp:
no thread, no blocking client, encoding in slices between which the loop serves requests. The SDK's
BatchSpanProcessor (`processor: thread`, and always for grpc) is wrapped so its drops are counted too.
A dead or slow collector costs dropped spans, counted in `gravity_trace_spans_dropped_total`, nothing else
(docs/decisions/0003-span-export.md).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter

from gateway.telemetry.config import BatchConfig

log = logging.getLogger("gravity.telemetry")

__all__ = ["CountingExporter", "CountingThreadProcessor", "ExportCounters", "LoopSpanProcessor"]

_ENCODE_SLICE = 64
"""Spans encoded between two yields to the loop: ~1 ms of protobuf work at most per slice."""


class ExportCounters:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.exported = Counter("gravity_trace_spans_exported", "Spans the collector accepted.", registry=r)
        self.dropped = Counter("gravity_trace_spans_dropped", "Spans lost: the export queue was full, or the "
                               "collector refused, failed or did not answer in time.", ["reason"], registry=r)
        self._exported = 0
        self._dropped = 0
        self._lock = threading.Lock()  # the thread processor counts from its worker thread

    def ok(self, n: int) -> None:
        with self._lock:
            self._exported += n
        self.exported.inc(n)

    def drop(self, n: int, reason: str) -> None:
        with self._lock:
            self._dropped += n
        self.dropped.labels(reason).inc(n)

    @property
    def totals(self) -> tuple[int, int]:
        """(exported, dropped) so far."""
        with self._lock:
            return self._exported, self._dropped


class LoopSpanProcessor(SpanProcessor):
    """Batches ended spans in a bounded queue and exports them from a task on the event loop.

    `on_end` only appends (a full queue drops the span and counts it); the task wakes every
    `schedule_delay_ms`, or as soon as a batch is full, and sends one batch at a time, so a slow
    collector fills the queue instead of piling up requests."""

    def __init__(self, url: str, headers: Mapping[str, str], timeout_s: float, compression: str,
                 batch: BatchConfig, counters: ExportCounters) -> None:
        self._url = url
        self._headers = {**headers, "content-type": "application/x-protobuf"}
        if compression == "gzip":
            self._headers["content-encoding"] = "gzip"
        self._gzip = compression == "gzip"
        self._timeout = timeout_s
        self._delay = batch.schedule_delay_ms / 1000
        self._batch = batch.max_export_batch_size
        self._max = batch.max_queue_size
        self._shutdown_s = batch.export_timeout_ms / 1000
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self.counters = counters
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- SpanProcessor ------------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if len(queue) >= self._max:
            self.counters.drop(1, "queue_full")
            return
        queue.append(span)
        wake = self._wake
        if wake is not None and len(queue) >= self._batch and not wake.is_set():
            wake.set()

    def shutdown(self) -> None:
        pass  # `stop` (async, from the lifespan) flushes; the provider's shutdown must not block the loop

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # -- the export task ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout),
                                              skip_auto_headers=("User-Agent",))
        self._task = asyncio.create_task(self._run(), name="gravity-span-export")

    async def stop(self) -> None:
        """Send what is queued (bounded by OTEL_BSP_EXPORT_TIMEOUT), then close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._shutdown_s):
                await self._drain()
        if self._queue:
            self.counters.drop(len(self._queue), "shutdown")
            self._queue.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def flush(self) -> None:
        await self._drain()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._delay):
                    await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        queue = self._queue
        while queue:
            n = min(self._batch, len(queue))
            batch = [queue.popleft() for _ in range(n)]
            await self._export(batch)

    async def _export(self, batch: Sequence[ReadableSpan]) -> None:
        # Serialized ExportTraceServiceRequests concatenate into one (protobuf merges repeated fields),
        # so a big batch is encoded slice by slice with the loop free in between.
        parts = []
        for i in range(0, len(batch), _ENCODE_SLICE):
            if i:
                await asyncio.sleep(0)
            parts.append(encode_spans(batch[i:i + _ENCODE_SLICE]).SerializePartialToString())
        body = b"".join(parts)
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
        session = self._session
        if session is None:
            self.counters.drop(len(batch), "shutdown")
            return
        try:
            async with session.post(self._url, data=body, headers=self._headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.counters.drop(len(batch), "unreachable" if not isinstance(exc, TimeoutError) else "timeout")
            _note(f"the trace collector at {self._url} is unreachable ({type(exc).__name__}): spans are dropped")
            return
        if 200 <= status < 300:
            self.counters.ok(len(batch))
        else:
            self.counters.drop(len(batch), f"http_{status // 100}xx")
            _note(f"the trace collector at {self._url} answered HTTP {status}: spans are dropped")


_noted: dict[str, int] = {}


def _note(message: str) -> None:
    """One warning per distinct trouble (a dead collector must not flood the log it is meant to spare)."""
    if message not in _noted and len(_noted) < 100:
        _noted[message] = 1
        log.warning(message)


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
