"""Upstream client choice for a Starlette proxy: aiohttp vs httpx, measured in one run.

    .venv/bin/python loadtests/bench_http_clients.py        # needs nginx and wrk, ~1 minute

The same minimal proxy (bare_proxy.py's shape) runs once per client against harness.py's
static nginx upstream; wrk drives 32 connections. Backs docs/decisions/0001-aiohttp.md. httpx is
measured as whichever of `httpx` / `httpx2` (its maintained fork, which the openai SDK uses) is
installed; "httpx+aiohttp" is httpx's API over an aiohttp transport, LiteLLM's approach.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import shutil
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bench  # a sibling script, not a package

RESULTS = bench.REPO / "loadtests" / "results" / "http_clients.json"


def _httpx() -> Any:
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    return None


def create_app(client: str, upstream: str) -> Any:
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    httpx = _httpx()
    url = f"{upstream}/v1/chat/completions"
    state: dict[str, Any] = {}

    class AiohttpTransport(httpx.AsyncBaseTransport if httpx else object):  # type: ignore[misc]
        def __init__(self, session: aiohttp.ClientSession) -> None:
            self.session = session

        async def handle_async_request(self, request: Any) -> Any:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            async with self.session.request(request.method, str(request.url), headers=headers,
                                            data=request.content) as resp:
                content = await resp.read()
            return httpx.Response(resp.status, headers=list(resp.headers.items()), content=content)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        if client == "aiohttp":
            state["post"] = _aiohttp_post(session)
        elif client == "httpx":
            state["http"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                                  max_keepalive_connections=64))
            state["post"] = _httpx_post(state["http"])
        else:
            state["http"] = httpx.AsyncClient(transport=AiohttpTransport(session))
            state["post"] = _httpx_post(state["http"])
        try:
            yield
        finally:
            if "http" in state:
                await state["http"].aclose()
            await session.close()

    def _aiohttp_post(session: aiohttp.ClientSession) -> Any:
        async def post(body: bytes) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                return resp.status, await resp.read()
        return post

    def _httpx_post(http: Any) -> Any:
        async def post(body: bytes) -> tuple[int, bytes]:
            resp = await http.post(url, content=body, headers={"content-type": "application/json"})
            return int(resp.status_code), bytes(resp.content)
        return post

    async def chat(request: Request) -> Response:
        status, content = await state["post"](await request.body())
        return Response(content, status_code=status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def serve(client: str, port: int, upstream: str) -> None:
    import uvicorn

    uvicorn.run(create_app(client, upstream), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=("aiohttp", "httpx", "httpx+aiohttp"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.upstream)
        return 0
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 120:
        parser.error("--rounds must be 1..20 and --seconds 1..120")
    nginx, wrk = shutil.which("nginx") or "/usr/sbin/nginx", shutil.which("wrk")
    if not Path(nginx).exists() or not wrk:
        print(bench.INSTALL_HINT.format(what="nginx and wrk"), file=sys.stderr)
        return 2
    httpx = _httpx()
    clients = ["aiohttp", *(["httpx", "httpx+aiohttp"] if httpx else [])]
    if not httpx:
        print("neither httpx nor httpx2 is installed: measuring aiohttp only", file=sys.stderr)

    started = dt.datetime.now(dt.UTC)
    busy = bench._busy_processes()
    samples: dict[str, list[bench.Sample]] = {c: [] for c in clients}
    with bench.stack() as s:
        lua = s.tmp / "post.lua"
        lua.write_text(bench.WRK_LUA.format(body=bench.REQUEST.decode()))
        upstream = bench.start_nginx(s, nginx)
        ports = {}
        for c in clients:
            ports[c] = bench.free_port()
            s.start(c, [sys.executable, __file__, "--serve", c, "--port", str(ports[c]),
                        "--upstream", f"http://127.0.0.1:{upstream}"], ports[c])
            bench.wait_routable(ports[c])
            bench.run_wrk(wrk, lua, ports[c], args.connections, 1)
        for r in range(args.rounds):
            for c in clients:
                sample = bench.run_wrk(wrk, lua, ports[c], args.connections, args.seconds)
                samples[c].append(sample)
                print(f"round {r + 1}/{args.rounds} {c:14} {sample.rps:8.0f} req/s  p50 {sample.p50_ms:6.2f} ms  "
                      f"p99 {sample.p99_ms:7.2f} ms  errors {sample.errors}", flush=True)
    rps = {c: statistics.median(x.rps for x in v) for c, v in samples.items()}
    print()
    for c in clients:
        print(f"{c:14} {rps[c]:8.0f} req/s  ({rps[c] / rps['aiohttp']:.2f} x aiohttp)")
    report = {
        "date": started.isoformat(timespec="seconds"), "connections": args.connections,
        "seconds_per_measurement": args.seconds, "rounds": args.rounds,
        "httpx_module": f"{httpx.__name__} {httpx.__version__}" if httpx else None,
        "machine": bench._machine(), "busy_processes_at_start": busy,
        "median_rps": rps,
        "results": {c: [vars(x) for x in v] for c, v in samples.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
