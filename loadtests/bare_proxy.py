"""The floor for a Python proxy: Starlette on uvicorn, one shared aiohttp session, no routing or policy.

bench_overhead.py runs it beside the gateway so the gateway's cost is read against what the stack
itself costs. Usage: python loadtests/bare_proxy.py --port 8081 --upstream http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        try:
            yield
        finally:
            await session.close()

    async def chat(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        async with session.post(f"{upstream}/v1/chat/completions", data=body,
                                headers={"content-type": "application/json"}) as resp:
            return Response(await resp.read(), status_code=resp.status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream.rstrip("/")), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
