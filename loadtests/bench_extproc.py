"""Envoy ext_proc overhead: one static nginx upstream measured, in one run, straight through Envoy,
through Envoy with a processor per `--variants` entry (`gravity extproc` in several body modes and
`read_response` settings, or loadtests/null_extproc.py, the do-nothing floor on the same gRPC
stack), and through `gravity serve` (the proxy). docs/extproc.md has the variants and figures.

    make envoy && .venv/bin/python loadtests/bench_extproc.py     # ~2 minutes; needs nginx and wrk
    apt-get install -y nginx-light wrk                            # Debian packages it uses

Prints req/s at 32 connections and p50/p99 at 1 connection for each target, each ext_proc target's
added p50 against Envoy direct measured in the same rounds, and the sidecar's CPU per request, and
writes them to loadtests/results/extproc.json. Everything binds to 127.0.0.1 and is time-bounded.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    INSTALL_HINT,
    MODEL,
    REPO,
    REQUEST,
    WRK_LUA,
    Stack,
    _busy_processes,
    _machine,
    _median,
    free_port,
    run_rounds,
    stack,
    start_nginx,
    wait_routable,
)

RESULTS = REPO / "loadtests" / "results" / "extproc.json"
TARGET_ADDED_P50_MS = 0.5


def _envoy_bin() -> str:
    found = os.environ.get("GRAVITY_ENVOY") or str(REPO / ".venv-envoy" / "bin" / "envoy")
    if not Path(found).exists():
        raise SystemExit(f"Envoy not found at {found}: run `make envoy`")
    return found


VARIANTS: dict[str, tuple[str, str, str]] = {
    # label: (request body mode, response body mode, extproc.read_response)
    "full-duplex": ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED", "always"),
    "buffered": ("BUFFERED", "FULL_DUPLEX_STREAMED", "always"),
    "fd-streamed": ("FULL_DUPLEX_STREAMED", "STREAMED", "always"),
    "fd-streamed-skip": ("FULL_DUPLEX_STREAMED", "STREAMED", "when_settling"),
    "buffered-streamed": ("BUFFERED", "STREAMED", "always"),
    "buffered-streamed-skip": ("BUFFERED", "STREAMED", "when_settling"),
    # loadtests/null_extproc.py instead of the sidecar: the floor of grpc.aio + Envoy's filter
    "null-full-duplex": ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED", "null"),
    "null-buffered-streamed": ("BUFFERED", "STREAMED", "null"),
    "null-buffered-no-response": ("BUFFERED", "STREAMED", "null-skip"),
    "null-buffered-streamed-asyncio": ("BUFFERED", "STREAMED", "null --server aio-asyncio"),
    "null-buffered-streamed-sync": ("BUFFERED", "STREAMED", "null --server sync"),
    "null-buffered-streamed-latency": ("BUFFERED", "STREAMED", "null --option grpc.optimization_target=latency"),
}
"""Sidecar setups measured (`--variants`): body modes as Envoy is configured, and whether the
sidecar skips reading answers it has nothing to settle from (`mode_override`)."""


def _envoy_config(listen: int, admin: int, upstream: int, extproc: int | None, body_mode: str,
                  response_mode: str = "FULL_DUPLEX_STREAMED", allow_override: bool = False) -> dict[str, Any]:
    """config/envoy.yaml with ports changed; without ext_proc ("direct"), the same listener routes to a
    STATIC cluster of the upstream."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "config" / "envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    clusters = cfg["static_resources"]["clusters"]
    if extproc is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        routes[:] = [{"match": {"prefix": "/"}, "route": {"cluster": "direct", "timeout": "0s"}}]
        clusters[:] = [{"name": "direct", "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
            "cluster_name": "direct", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}]
        return cfg
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    ext["processing_mode"]["request_body_mode"] = body_mode
    ext["processing_mode"]["response_body_mode"] = response_mode
    ext["allow_mode_override"] = allow_override
    if body_mode != "FULL_DUPLEX_STREAMED":
        ext["processing_mode"].pop("request_trailer_mode", None)
    if response_mode == "FULL_DUPLEX_STREAMED":
        ext["processing_mode"]["response_trailer_mode"] = "SEND"  # Envoy requires it with full duplex
    else:
        ext["processing_mode"].pop("response_trailer_mode", None)
    side = next(c for c in clusters if c["name"] == "gravity_extproc")
    side["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] = extproc
    return cfg


def _start_envoy(s: Stack, name: str, upstream: int, extproc: int | None, body_mode: str = "",
                 response_mode: str = "FULL_DUPLEX_STREAMED", allow_override: bool = False) -> int:
    listen = free_port()
    path = s.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_envoy_config(listen, free_port(), upstream, extproc, body_mode,
                                                 response_mode, allow_override)))
    s.start(name, [_envoy_bin(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                   "--log-level", "error"], listen)
    return listen


def _gravity_config(s: Stack, name: str, upstream: int, port: int, mode: str, read_response: str = "always") -> Path:
    path = s.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port},
        "extproc": {"host": "127.0.0.1", "port": port, "body_mode": mode, "read_response": read_response},
        "state": {"embedded_dir": str(s.tmp / f"redis-{name}")},
        "backends": [{"name": "nginx-0", "url": f"http://127.0.0.1:{upstream}", "kind": "vllm",
                      "models": [MODEL]}]}))
    return path


def relay_cost(chunks: int = 20_000) -> dict[str, float]:
    """Sidecar CPU per streamed response chunk, in-process: decode Envoy's message, split the SSE
    event, read usage, encode the answer. Envoy waits for this answer before sending the chunk on."""
    import asyncio
    import time

    import orjson

    from gateway.exchange import Exchange
    from gateway.extproc.decider import Pick
    from gateway.extproc.pb import core, ep
    from gateway.extproc.stream import ExtProcStream
    from routing.types import RoutingRequest

    class Quiet:
        async def served(self, pick: Pick, address: str | None) -> None: ...
        def first_token(self, pick: Pick) -> None: ...
        async def finish(self, pick: Pick) -> None: ...

    ex = Exchange(request_id="b", route="chat/completions", model=MODEL, body={}, raw=b"", stream=True,
                  client_wants_usage=False, routing=RoutingRequest(model=MODEL, prompt=b""), forward_headers={})
    stream = ExtProcStream(Quiet(), max_body_bytes=1 << 20)  # type: ignore[arg-type]
    stream.pick = Pick(exchange=ex, addresses=["127.0.0.1:1"], set_headers={}, remove_headers=[], body=b"")
    head = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=core.HeaderMap(headers=[
        core.HeaderValue(key=":status", raw_value=b"200"),
        core.HeaderValue(key="content-type", raw_value=b"text/event-stream")])))
    event = b"data: " + orjson.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                                      "created": 1700000000, "model": MODEL, "choices": [
                                          {"index": 0, "delta": {"content": " word"}, "logprobs": None,
                                           "finish_reason": None}]}) + b"\n\n"
    wire = ep.ProcessingRequest(response_body=ep.HttpBody(body=event)).SerializeToString()

    async def run() -> float:
        await stream.handle(head)
        started = time.perf_counter()
        for _ in range(chunks):
            msg = ep.ProcessingRequest.FromString(wire)
            for out in await stream.handle(msg):
                out.SerializeToString()
        return (time.perf_counter() - started) / chunks * 1e6

    return {"us_per_chunk": min(asyncio.run(run()) for _ in range(3)), "chunk_bytes": float(len(event))}


def decision_cost(requests: int = 3000) -> float:
    """Sidecar CPU per request without gRPC: Envoy's four messages (request headers and body,
    response headers and body) through ExtProcStream and the real GatewayDecider, answers encoded."""
    import asyncio
    import time

    from harness import COMPLETION

    from gateway.config import parse_config
    from gateway.core import build_core
    from gateway.extproc.decider import GatewayDecider
    from gateway.extproc.pb import core, ep
    from gateway.extproc.stream import ExtProcStream

    cfg = parse_config({"state": {"redis_url": "redis://127.0.0.1:1/0"},  # never connected: no limits
                        "backends": [{"name": "n", "url": "http://127.0.0.1:1", "models": [MODEL]}]})
    gw = build_core(cfg)
    decider = GatewayDecider(gw, cfg.extproc)

    def headers(*pairs: tuple[str, bytes]) -> ep.HttpHeaders:
        return ep.HttpHeaders(headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v)
                                                              for k, v in pairs]))
    wires = [m.SerializeToString() for m in (
        ep.ProcessingRequest(request_headers=headers((":method", b"POST"), (":path", b"/v1/chat/completions"),
                                                     ("content-type", b"application/json")),
                             protocol_config=ep.ProtocolConfiguration(request_body_mode=4, response_body_mode=4)),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=REQUEST, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=headers((":status", b"200"), ("content-type", b"application/json"))),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=COMPLETION.encode(), end_of_stream=True)))]

    async def run() -> float:
        await decider.resolve(asyncio.get_running_loop())
        decider.started = True

        async def one() -> None:
            stream = ExtProcStream(decider, max_body_bytes=1 << 20)
            for raw in wires:
                for out in await stream.handle(ep.ProcessingRequest.FromString(raw)):
                    out.SerializeToString()
            await stream.close(cancelled=False)
        for _ in range(200):
            await one()
        started = time.process_time()
        for _ in range(requests):
            await one()
        return (time.process_time() - started) / requests * 1e6

    return min(asyncio.run(run()) for _ in range(3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--variants", default="full-duplex,buffered",
                    help=f"sidecar setups, comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--no-proxy", action="store_true", help="leave out `gravity serve`")
    ap.add_argument("--profile", type=Path, help="run each sidecar under cProfile, writing DIR/<variant>.prof "
                                                 "(slows it: for where the time goes, not for the figures)")
    args = ap.parse_args(argv)
    nginx, wrk = shutil.which("nginx") or "/usr/sbin/nginx", shutil.which("wrk")
    if not Path(nginx).exists():
        raise SystemExit(INSTALL_HINT.format(what="nginx"))
    if wrk is None:
        raise SystemExit(INSTALL_HINT.format(what="wrk"))
    py = sys.executable
    machine = {**_machine(), "busy_at_start": _busy_processes()}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with stack() as s:
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()))
        upstream = start_nginx(s, nginx)
        targets: dict[str, int] = {"envoy-direct": _start_envoy(s, "envoy-direct", upstream, None)}
        sidecars: dict[str, str] = {}
        for label in args.variants.split(","):
            mode, response_mode, read_response = VARIANTS[label]
            port = free_port()
            if read_response.startswith("null"):
                s.start(f"extproc-{label}", [py, str(Path(__file__).parent / "null_extproc.py"), "--port", str(port),
                                             "--destination", f"127.0.0.1:{upstream}"]
                        + (["--skip-response"] if read_response == "null-skip" else [])
                        + read_response.split()[1:], port)
            else:
                cfg = _gravity_config(s, f"extproc-{label}", upstream, port, mode.lower(), read_response)
                prof = ["-m", "cProfile", "-o", str(args.profile / f"{label}.prof")] if args.profile else []
                s.start(f"extproc-{label}", [py, *prof, "-m", "gateway", "extproc", "--config", str(cfg)], port)
            name = f"envoy+extproc-{label}"
            targets[name] = _start_envoy(s, name, upstream, port, mode, response_mode,
                                         read_response in ("when_settling", "null-skip"))
            sidecars[name] = f"extproc-{label}"
        if not args.no_proxy:
            proxy_port = free_port()
            s.start("gravity-proxy", [py, "-m", "gateway", "serve", "--config",
                                      str(_gravity_config(s, "proxy", upstream, proxy_port, "full_duplex_streamed"))],
                    proxy_port)
            targets["gravity-proxy"] = proxy_port
        for port in targets.values():
            wait_routable(port)
        # CPU is counted for the process doing the extra work: the sidecar where there is one.
        pids = {name: s.pids[sidecars.get(name, name)] for name in targets}
        results = run_rounds(wrk, lua, targets, pids, args.connections, args.rounds, args.seconds)
    summary: dict[str, dict[str, Any]] = {}
    for name in targets:
        busy, single = _median(results[(name, args.connections)]), _median(results[(name, 1)])
        summary[name] = {f"c{args.connections}": asdict(busy), "c1": asdict(single)}
    base = summary["envoy-direct"]
    print(f"\n{'target':26} {'req/s c=' + str(args.connections):>12} {'p50 c=1':>9} {'p99 c=1':>9} "
          f"{'+p50 vs direct':>15} {'sidecar cpu/req':>16}")
    for name, fig in summary.items():
        added = fig["c1"]["p50_ms"] - base["c1"]["p50_ms"]
        fig["added_p50_ms_c1"] = added
        fig["rps_ratio_vs_envoy_direct"] = fig[f"c{args.connections}"]["rps"] / base[f"c{args.connections}"]["rps"]
        cpu = fig[f"c{args.connections}"]["cpu_us_per_request"] if name in sidecars else None
        print(f"{name:26} {fig[f'c{args.connections}']['rps']:12.0f} {fig['c1']['p50_ms']:8.3f}ms "
              f"{fig['c1']['p99_ms']:8.3f}ms {added:+14.3f}ms "
              f"{(f'{cpu:.0f} us' if cpu else '-'):>16}")
    for name in sidecars:
        ok = summary[name]["added_p50_ms_c1"] <= TARGET_ADDED_P50_MS
        print(f"{name}: adds {summary[name]['added_p50_ms_c1']:.3f} ms p50 at c=1 "
              f"(target <= {TARGET_ADDED_P50_MS} ms: {'met' if ok else 'NOT met'})")
    handling = decision_cost()
    print(f"sidecar CPU per request without gRPC (4 messages in, 4 answers): {handling:.0f} us "
          f"(in-process, best of 3)")
    chunk = relay_cost()
    print(f"sidecar CPU per streamed SSE chunk ({chunk['chunk_bytes']:.0f} bytes): "
          f"{chunk['us_per_chunk']:.1f} us (in-process, best of 3)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python loadtests/bench_extproc.py " + " ".join(argv or sys.argv[1:]),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine,
        "rounds": args.rounds, "seconds": args.seconds, "results": summary, "stream_chunk": chunk,
        "sidecar_us_per_request_without_grpc": handling}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
