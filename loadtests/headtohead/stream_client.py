"""Streamed load for the overhead part: C keep-alive connections, each sending streamed chat
requests back to back for a fixed time, recording when every SSE event arrives.

Raw asyncio + httptools (the cheapest client this stack has), so the client costs the same in front
of every system. Gaps between consecutive `data:` events of one response give the inter-chunk
latency; events that arrive in one read share a timestamp (a relay that batches shows up as 0 gaps
followed by a long one).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field

import httptools


@dataclass
class StreamSample:
    streams: int = 0
    chunks: int = 0
    errors: int = 0
    seconds: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    cpu_us_per_chunk: float | None = None

    def summary(self) -> dict[str, float | int | None]:
        def q(values: list[float], p: int) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else float("nan")
        return {"streams": self.streams, "chunks": self.chunks, "errors": self.errors,
                "streams_per_s": self.streams / self.seconds if self.seconds else 0.0,
                "chunks_per_s": self.chunks / self.seconds if self.seconds else 0.0,
                "gap_p50_ms": q(self.gaps_ms, 50), "gap_p99_ms": q(self.gaps_ms, 99),
                "ttfb_p50_ms": q(self.ttfb_ms, 50), "ttfb_p99_ms": q(self.ttfb_ms, 99),
                "cpu_us_per_chunk": self.cpu_us_per_chunk}


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.events: list[float] = []
        self.status = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done and not self.done.done():
            self.done.set_exception(ConnectionError("closed mid-response"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done and not self.done.done():
                self.done.set_exception(exc)

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        n = body.count(b"data: ")
        self.events.extend([now] * n)

    def on_message_complete(self) -> None:
        if self.done and not self.done.done():
            self.done.set_result(self.status)
        self.parser = httptools.HttpResponseParser(self)


async def _worker(port: int, request: bytes, deadline: float, content: int, out: StreamSample) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    while time.perf_counter() < deadline:
        try:
            if conn is None or conn.transport is None or conn.transport.is_closing():
                _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
            conn.done = loop.create_future()
            conn.events = []
            started = time.perf_counter()
            assert conn.transport is not None
            conn.transport.write(request)
            status = await asyncio.wait_for(conn.done, 30)
        except (OSError, ConnectionError, TimeoutError, httptools.HttpParserError):
            out.errors += 1
            conn = None
            await asyncio.sleep(0.01)
            continue
        events = conn.events
        # The [DONE] marker and the usage chunk count as relayed chunks too.
        if status != 200 or not events:
            out.errors += 1
            continue
        out.streams += 1
        out.chunks += len(events)
        out.ttfb_ms.append((events[0] - started) * 1000)
        # Gaps between the content chunks only: the usage chunk and [DONE] leave the upstream together.
        body = events[:content]
        out.gaps_ms.extend((b - a) * 1000 for a, b in itertools.pairwise(body))


def build_request(model: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Stream, please."}],
                       "max_tokens": max_tokens, "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


async def run_streams(port: int, connections: int, seconds: float, request: bytes, content: int) -> StreamSample:
    out = StreamSample()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_worker(port, request, deadline, content, out) for _ in range(connections)))
    out.seconds = time.perf_counter() - started
    return out
