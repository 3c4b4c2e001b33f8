"""The floor for a Python proxy: Starlette on uvicorn, one shared aiohttp session, no routing or policy.

bench_overhead.py runs it beside the gateway so the gateway's cost is read against what the stack
itself costs. Usage: python loadtests/bare_proxy.py --port 8081 --upstream http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
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


def app_from_env() -> Starlette:
    """For servers that import the app by name (granian): the upstream comes from the environment."""
    return create_app(os.environ["BARE_PROXY_UPSTREAM"].rstrip("/"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="granian: the Rust HTTP server (ASGI, one worker, one runtime thread, uvloop)")
    args = parser.parse_args()
    if args.server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        os.environ["BARE_PROXY_UPSTREAM"] = args.upstream
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        Granian("bare_proxy:app_from_env", address=args.host, port=args.port, interface=Interfaces.ASGI,
                factory=True, workers=1, runtime_threads=1, loop=Loops.uvloop, http="1",
                log_enabled=False).serve()
        return
    uvicorn.run(create_app(args.upstream.rstrip("/")), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
