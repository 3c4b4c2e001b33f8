"""Benchmark: the evaluator's policy ranking, checked end to end through the HTTP gateway and simulators.

Starts N simulators (h100-8b, time-scaled), a redis-server, and one gateway per policy; replays a
short shared-prefix workload (streamed, loopback only) and prints TTFT p50/p90 and cache hit rate
per policy with the ratio against round-robin. Simulators are reset between policies.

Run: .venv/bin/python loadtests/realtime_routing.py [--backends 4] [--requests 240] [--rate 10]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routing.eval.metrics import percentile
from routing.eval.workloads import WorkloadOptions, generate
from tests.support.procs import Proc, free_port, start_gateway, start_redis

MODEL = "sim-llama"
# policy name -> routing section (the default profile is RoutingConfig's own default)
POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "round-robin": {"profiles": [{"name": "round-robin", "picker": "round-robin"}]},
    "least-request": {"profiles": [{"name": "least-request", "plugins": [{"ref": "least-request-scorer"}]}]},
    "cache-aware": {"profiles": [{"name": "cache-aware", "picker": "cache-aware"}]},
}


def start_simulator(tmp: Path, time_scale: float) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
            "--profile", "h100-8b", "--time-scale", str(time_scale)]
    return Proc(args, port, tmp / f"sim-{port}.log").start()


async def one(session: aiohttp.ClientSession, base: str, body: dict[str, Any], time_scale: float,
              sem: asyncio.Semaphore) -> tuple[float, int, int, str]:
    """(TTFT in engine seconds, prompt tokens, cached tokens, backend) of one streamed request."""
    async with sem:
        started = time.perf_counter()
        ttft = None
        usage: dict[str, Any] = {}
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            backend = resp.headers.get("x-gravity-backend", "")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
                if event.get("usage"):
                    usage = event["usage"]
        details = usage.get("prompt_tokens_details") or {}
        # The simulators run time_scale x faster than real time; report engine (virtual) seconds.
        return ((ttft or 0.0) * time_scale, int(usage.get("prompt_tokens", 0)),
                int(details.get("cached_tokens") or 0), backend)


async def replay(base: str, sims: list[Proc], records: list[Any], time_scale: float,
                 max_s: float) -> list[tuple[float, int, int, str]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max_s)) as session:
        for s in sims:  # empty caches and queues for every policy
            async with session.post(f"http://127.0.0.1:{s.port}/admin/reset") as r:
                r.raise_for_status()
        await asyncio.sleep(0.5)  # let the gateway scrape the reset state
        sem = asyncio.Semaphore(256)
        t0 = time.perf_counter()
        tasks = []
        for rec in records:
            delay = rec.t / time_scale - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": MODEL, "messages": list(rec.messages), "max_tokens": rec.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            tasks.append(asyncio.create_task(one(session, base, body, time_scale, sem)))
        return await asyncio.wait_for(asyncio.gather(*tasks), max_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--rate", type=float, default=20.0, help="arrivals per engine second")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulators run this much faster than real time")
    ap.add_argument("--max-tokens", type=int, default=32,
                    help="output tokens per request (the workload's 256 would stream more chunks than a "
                         "2-core test box relays in real time; TTFT is what is measured)")
    ap.add_argument("--max-s", type=float, default=120.0, help="wall-clock cap per policy")
    ap.add_argument("--policy", action="append", choices=sorted(POLICIES))
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--warmup", type=int, default=60,
                    help="requests replayed (round-robin, discarded) before the first measured policy: a cold "
                         "simulator process is slow for its first seconds, which otherwise lands on whichever "
                         "policy runs first (it made cache-aware look better than the default)")
    args = ap.parse_args()
    records = [dataclasses.replace(r, max_tokens=args.max_tokens) for r in generate(
        "shared-prefix", WorkloadOptions(seed=1, requests=args.requests, rate=args.rate, model=MODEL))]
    tmp = Path(tempfile.mkdtemp(prefix="gravity-rt-"))
    redis = start_redis(tmp)
    sims = [start_simulator(tmp, args.time_scale) for _ in range(args.backends)]
    rows: list[dict[str, Any]] = []
    warmup = records[: args.warmup]
    try:
        for policy in (["warmup"] if warmup else []) + (args.policy or list(POLICIES)):
            cfg = {
                "server": {"debug_headers": True, "read_timeout_s": args.max_s},
                "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
                "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                             for i, s in enumerate(sims)],
                "routing": POLICIES["round-robin" if policy == "warmup" else policy],
            }
            gw = start_gateway(tmp, cfg)
            try:
                wall = time.perf_counter()
                if policy == "warmup":
                    # Errors are expected here (a cold simulator can miss scrapes and be shed): that is
                    # exactly the noise this pass keeps out of the measured runs.
                    try:
                        asyncio.run(replay(f"http://127.0.0.1:{gw.port}", sims, warmup, args.time_scale, args.max_s))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        print(f"warm-up: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                out = asyncio.run(replay(f"http://127.0.0.1:{gw.port}", sims, records, args.time_scale, args.max_s))
                wall = time.perf_counter() - wall
            finally:
                gw.stop()
            ttft = [o[0] for o in out]
            prompt, cached = sum(o[1] for o in out), sum(o[2] for o in out)
            spread = sorted({o[3] for o in out})
            rows.append({"policy": policy, "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
                         "hit_rate": cached / prompt if prompt else 0.0, "backends_used": len(spread),
                         "wall_s": wall})
            print(f"{policy:14s} done in {wall:.0f}s", file=sys.stderr, flush=True)
    finally:
        for p in (*sims, redis):
            p.stop()
    rr = next((r for r in rows if r["policy"] == "round-robin"), None)
    print(f"{args.backends} simulated h100-8b backends at {args.time_scale:g}x, {args.requests} shared-prefix "
          f"requests at {args.rate:g}/s (engine time), "
          f"{args.max_tokens} output tokens each")
    print("| policy | TTFT p50 s | TTFT p90 s | hit rate | p90 vs round-robin |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{rr['ttft_p90'] / r['ttft_p90']:.1f}x" if rr and r["ttft_p90"] else "-"
        print(f"| {r['policy']} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['hit_rate']:.3f} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
