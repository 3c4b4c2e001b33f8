"""An OpenAI-compatible backend that answers every chat completion at once and records the bodies
it was sent (GET /_recorded returns them): tests see exactly what a gateway forwarded upstream.

Run as `python -m tests.support.recorder PORT`.
"""
from __future__ import annotations

import sys
from typing import Any

import orjson
from aiohttp import web

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def make_app() -> web.Application:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        bodies.append(body)
        model = body.get("model", "")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": USAGE}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response({"id": "c", "object": "chat.completion", "created": 0, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}], "usage": USAGE})

    async def recorded(request: web.Request) -> web.Response:
        return web.json_response(bodies)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/_recorded", recorded)
    app.router.add_get("/metrics", metrics)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
