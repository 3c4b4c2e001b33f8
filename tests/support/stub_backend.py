"""A small OpenAI-compatible backend process for edge cases the simulator does not produce.

Real HTTP over loopback (aiohttp's server): gzip like nginx with `gzip on` (compress when the
request's Accept-Encoding allows it) or always, upstream auth failures, odd error bodies, and a
record of the headers each request arrived with (`GET /admin/requests`).

    python -m tests.support.stub_backend --port N --mode MODE
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from typing import Any

from aiohttp import web

MODES = ("plain", "gzip", "gzip-always", "auth-401", "auth-403", "error-odd")


def _completion(model: str, stream: bool) -> dict[str, Any]:
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello from the stub"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}


def _chunks(model: str) -> list[bytes]:
    out = []
    for word in ("hello ", "from ", "the ", "stub"):
        out.append(b"data: " + json.dumps({
            "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}).encode() + b"\n\n")
    out.append(b"data: " + json.dumps({
        "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def _gzip_wanted(mode: str, request: web.Request) -> bool:
    if mode == "gzip-always":
        return True
    return mode == "gzip" and "gzip" in request.headers.get("accept-encoding", "")


class Stub:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        model = str(body.get("model", "stub"))
        if self.mode in ("auth-401", "auth-403"):
            status = 401 if self.mode == "auth-401" else 403
            return web.json_response({"error": {"message": "Incorrect API key provided: sk-up***",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=status)
        if self.mode == "error-odd":
            return web.json_response({"object": "error", "message": "engine overloaded",
                                      "type": "EngineOverloadedError", "code": 503},
                                     status=503, headers={"Retry-After": "7"})
        zipped = _gzip_wanted(self.mode, request)
        if not body.get("stream"):
            raw = json.dumps(_completion(model, False)).encode()
            headers = {"Content-Type": "application/json"}
            if zipped:
                raw = gzip.compress(raw)
                headers["Content-Encoding"] = "gzip"
            return web.Response(body=raw, headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if zipped:
            resp.enable_compression(force=web.ContentCoding.gzip)
        await resp.prepare(request)
        for chunk in _chunks(model):
            await resp.write(chunk)
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model",
                                                              "created": 1, "owned_by": "stub"}]})

    async def admin_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=MODES, default="plain")
    args = ap.parse_args()
    stub = Stub(args.mode)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stub.chat)
    app.router.add_get("/v1/models", stub.models)
    app.router.add_get("/admin/requests", stub.admin_requests)
    app.router.add_get("/health", stub.health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
