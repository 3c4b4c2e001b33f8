"""Many concurrent streams held open: N streamed requests opened together, each relaying `chunks`
SSE chunks at the upstream's interval, through a system and directly to the upstream.

Bounded: N connections, each makes exactly one request and ends with its stream (or at the
deadline); the whole phase stops by itself after ramp + chunks x interval + a grace period. The
inter-chunk gaps are bucketed by when they were seen (windows over the hold), so growth in the
added latency (gap over the upstream's interval) while every stream is open shows as a rising p99
from the first window to the last.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class HoldSample:
    streams: int
    completed: int = 0
    errors: int = 0
    chunks: int = 0
    peak_open: int = 0
    gaps: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the first request, gap ms) for each pair of consecutive content chunks."""
    ttfb_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_us_per_chunk: float | None = None

    def summary(self, interval_ms: float, full_from_s: float, full_until_s: float,
                windows: int = 4) -> dict[str, Any]:
        """Figures over the whole hold, and per window of [full_from_s, full_until_s] (seconds since
        the first request: when every stream is open), where a queue building up would show."""
        def q(values: list[float], p: int) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else float("nan")
        gaps = [g for _, g in self.gaps]
        out: dict[str, Any] = {"streams": self.streams, "completed": self.completed, "errors": self.errors,
                               "peak_open": self.peak_open, "chunks": self.chunks, "seconds": self.seconds,
                               "ttfb_p50_ms": q(self.ttfb_ms, 50), "ttfb_p99_ms": q(self.ttfb_ms, 99),
                               "cpu_us_per_chunk": self.cpu_us_per_chunk,
                               "added_p50_ms": q(gaps, 50) - interval_ms, "added_p99_ms": q(gaps, 99) - interval_ms}
        width = (full_until_s - full_from_s) / windows
        per: list[list[float]] = [[] for _ in range(windows)]
        for t, g in self.gaps:
            if full_from_s <= t < full_until_s:
                per[min(windows - 1, int((t - full_from_s) / width))].append(g)
        out["windows"] = [{"from_s": full_from_s + i * width, "gaps": len(w), "added_p50_ms": q(w, 50) - interval_ms,
                           "added_p99_ms": q(w, 99) - interval_ms} for i, w in enumerate(per)]
        first, last = out["windows"][0], out["windows"][-1]
        out["growth_p50_ms"] = last["added_p50_ms"] - first["added_p50_ms"]
        out["growth_p99_ms"] = last["added_p99_ms"] - first["added_p99_ms"]
        return out


class _Stream(asyncio.Protocol):
    def __init__(self, origin: float, sample: HoldSample, content: int) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.origin, self.sample, self.content = origin, sample, content
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.events = 0
        self.last: float | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed mid-stream"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.done.done():
                self.done.set_exception(exc)

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        for _ in range(body.count(b"data: ")):
            if self.events == 0:
                self.sample.ttfb_ms.append((now - self.started) * 1000)
            elif self.events < self.content and self.last is not None:
                self.sample.gaps.append((now - self.origin, (now - self.last) * 1000))
            self.events += 1
            self.last = now

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def hold(port: int, streams: int, request: bytes, content: int, deadline_s: float,
               ramp_s: float = 2.0) -> HoldSample:
    """Open `streams` streamed requests over `ramp_s`, wait for all of them to end (or the deadline)."""
    loop = asyncio.get_running_loop()
    sample = HoldSample(streams)
    origin = time.perf_counter()
    open_now = 0

    async def one(i: int) -> None:
        nonlocal open_now
        await asyncio.sleep(ramp_s * i / streams)
        conn: _Stream | None = None
        try:
            _, conn = await loop.create_connection(lambda: _Stream(origin, sample, content), "127.0.0.1", port)
            open_now += 1
            sample.peak_open = max(sample.peak_open, open_now)
            conn.started = time.perf_counter()
            assert conn.transport is not None
            conn.transport.write(request)
            await asyncio.wait_for(conn.done, max(1.0, deadline_s - (time.perf_counter() - origin)))
            if conn.status == 200 and conn.events >= content:
                sample.completed += 1
            else:
                sample.errors += 1
            sample.chunks += conn.events
        except (OSError, ConnectionError, TimeoutError, httptools.HttpParserError):
            sample.errors += 1
        finally:
            if conn is not None:
                open_now -= 1
                if conn.transport is not None:
                    conn.transport.close()

    await asyncio.gather(*(one(i) for i in range(streams)))
    sample.seconds = time.perf_counter() - origin
    return sample
