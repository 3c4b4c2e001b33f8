"""A minimal streaming upstream: `POST /v1/chat/completions` answers `--chunks` SSE chunks, one every
`--interval-ms`, then the usage chunk and `data: [DONE]` (chunked transfer encoding, keep-alive).

Raw asyncio + httptools on uvloop, so its own CPU per chunk is small and the same for every system
in front of it. Also answers /v1/models, /metrics, /health, render and /tokenize like the nginx one.

    python loadtests/headtohead/sse_upstream.py --port 9100 --port 9101 --chunks 32 --interval-ms 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import METRICS, MODELS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstreams import MODEL, RENDER, TOKENIZE


def _chunk(i: int, text: str | None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, object] = {"id": "chatcmpl-sse", "object": "chat.completion.chunk", "created": 1700000000,
                               "model": MODEL,
                               "choices": [] if text is None else [{"index": 0, "delta": {"content": text},
                                                                   "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    data = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream(asyncio.Protocol):
    def __init__(self, chunks: int, interval: float) -> None:
        self.chunks, self.interval = chunks, interval
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.queue.put_nowait(self.url.split(b"?", 1)[0])
        self.url = b""

    async def _serve(self) -> None:
        while True:
            path = await self.queue.get()
            t = self.transport
            assert t
            if path == b"/v1/chat/completions":
                t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(self.chunks):
                    await asyncio.sleep(self.interval)
                    if t.is_closing():
                        return
                    t.write(_chunk(i, " word", "length" if i == self.chunks - 1 else None))
                usage = {"prompt_tokens": 27, "completion_tokens": self.chunks, "total_tokens": 27 + self.chunks}
                done = b"data: [DONE]\n\n"
                t.write(_chunk(self.chunks, None, usage=usage) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                continue
            static = {b"/v1/models": (MODELS, "application/json"), b"/metrics": (METRICS, "text/plain"),
                      b"/health": ("{}", "application/json"), b"/v1/chat/completions/render": (RENDER, "application/json"),
                      b"/tokenize": (TOKENIZE, "application/json"),
                      b"/version": ('{"version":"0.0.0"}', "application/json")}.get(path)
            status, (body, ctype) = (b"200 OK", static) if static else (b"404 Not Found", ('{"error":{}}', "application/json"))
            raw = body.encode()
            t.write(b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, ctype.encode(), len(raw), raw))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--interval-ms", type=float, default=10.0)
    args = ap.parse_args()
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: Upstream(args.chunks, args.interval_ms / 1000), "127.0.0.1", port,
                                        backlog=4096, reuse_address=True) for port in args.port]
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    uvloop.run(main())
