"""Getting finished spans to the collector without ever making a request wait for it.

`LoopSpanProcessor` (the default) encodes each LiteSpan as it ends (otlp.py) and queues the bytes, so
a span object dies with its request (the queue holds nothing the garbage collector walks), and a task
on the event loop posts batches as OTLP/HTTP protobuf with aiohttp: no thread, no blocking client. A dead or slow collector costs dropped spans, counted in
`gravity_trace_spans_dropped_total`, nothing else (docs/decisions/0004-span-recorder.md).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import logging
import threading
from collections.abc import Mapping, Sequence

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from gateway.telemetry.config import BatchConfig
from gateway.telemetry.otlp import encode_span, request_prefix
from gateway.telemetry.spans import LiteSpan

log = logging.getLogger("gravity.telemetry")

__all__ = ["ExportCounters", "LoopSpanProcessor"]


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


class LoopSpanProcessor:
    """Batches ended spans in a bounded queue and exports them from a task on the event loop.

    `on_end` only appends (a full queue drops the span and counts it); the task wakes every
    `schedule_delay_ms` to send what is queued, or as soon as a batch is full to send full batches,
    one at a time, so a slow collector fills the queue instead of piling up requests."""

    def __init__(self, url: str, headers: Mapping[str, str], timeout_s: float, compression: str,
                 batch: BatchConfig, counters: ExportCounters, prefix: tuple[bytes, bytes]) -> None:
        self._prefix = prefix
        """The encoded Resource and InstrumentationScope, the same in every export."""
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
        self._queue: collections.deque[bytes] = collections.deque()
        """Encoded `Span` messages (each as the `spans` field of a ScopeSpans)."""
        self.counters = counters
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- the recorder's sink --------------------------------------------------------------------------
    def on_end(self, span: LiteSpan) -> None:
        queue = self._queue
        if len(queue) >= self._max:
            self.counters.drop(1, "queue_full")
            return
        queue.append(encode_span(span))
        wake = self._wake
        if wake is not None and len(queue) >= self._batch and not wake.is_set():
            wake.set()

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
            timed_out = False
            try:
                async with asyncio.timeout(self._delay):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True
            self._wake.clear()
            # A full batch wakes the task to send full batches; the schedule delay sends what waits.
            await self._drain(full_only=not timed_out)

    async def _drain(self, full_only: bool = False) -> None:
        """Export what is queued now, or only its full batches. Not what arrives meanwhile: chasing the
        queue sent a batch of a few spans after every export (one HTTP request per few requests served,
        2/3 of tracing's cost: docs/tracing.md)."""
        queue = self._queue
        size = self._batch
        left = len(queue)
        while left > 0 and (not full_only or left >= size):
            n = min(size, left, len(queue))
            if n == 0:
                break
            left -= n
            batch = [queue.popleft() for _ in range(n)]
            await self._export(batch)

    async def _export(self, batch: Sequence[bytes]) -> None:
        parts = [request_prefix(self._prefix, sum(map(len, batch)))]
        parts += batch
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


