"""Benchmark: approximate vs precise prefix routing through the real HTTP gateway and simulators
publishing KV events (ZMQ), on llm-d's workload (prefix working set ~6x one replica's KV).

N simulators (h100-8b with a scaled-down KV, events on), a redis-server, one gateway per policy;
simulators are reset between policies (the gateways see the restarts). Prints TTFT p50/p90 (engine
seconds) and hit rate per policy, with the p90 ratio against the approximate default.

Run: .venv/bin/python loadtests/realtime_kv.py [--backends 4] [--requests 300] [--rate 3.9] [--kv-blocks 4096] [--seed 2]
With ``--eval`` the same trace is also replayed in the evaluator (virtual time) for the same two policies.
With ``--replicas 3`` the precise profile runs through one gateway, then through 3 gateway processes
on the same Redis with requests sprayed round-robin across them: with their in-flight counts and the
precise scorer's pending marks shared through Redis (the default), with the counts only
(``shared_inflight.pending: false``), and with ``--own`` also with each replica's own counts
(``shared_inflight.enabled: false``). ``--workload`` picks another built-in workload than llm-d's;
``--time-scale`` below 1 runs the engines slower than real time, so a heavier workload's arrivals
and the gateways' own CPU stay small against the engine seconds measured.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))
from realtime_routing import one, replay

from routing.eval.metrics import percentile
from routing.eval.workloads import WorkloadOptions, generate
from tests.support.kv import precise_routing
from tests.support.procs import Proc, free_port, start_gateway, start_redis

MODEL = "sim-llama"


def start_simulator(tmp: Path, kv_blocks: int, time_scale: float) -> tuple[Proc, dict[str, Any]]:
    port, pub, rep = free_port(), free_port(), free_port()
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
              "replay_endpoint": f"tcp://*:{rep}", "topic": "kv-events"}
    args = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
            "--profile", "h100-8b", "--kv-blocks", str(kv_blocks), "--time-scale", str(time_scale),
            "--kv-events-config", json.dumps(events)]
    entry = {"endpoint": f"tcp://127.0.0.1:{pub}", "replay_endpoint": f"tcp://127.0.0.1:{rep}", "topic": "kv-events"}
    return Proc(args, port, tmp / f"sim-{port}.log").start(timeout=90.0), entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=3.93, help="peak arrivals per engine second (llm-d ramps to it)")
    ap.add_argument("--kv-blocks", type=int, default=4096)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-s", type=float, default=300.0)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval", action="store_true", help="also run the trace through the evaluator")
    ap.add_argument("--out")
    ap.add_argument("--replicas", type=int, default=0,
                    help="precise through 1 and N gateways: counts and pending marks shared, counts only")
    ap.add_argument("--own", action="store_true", help="with --replicas: also N gateways sharing nothing")
    ap.add_argument("--workload", default="llm-d")
    args = ap.parse_args()
    opts = WorkloadOptions(seed=args.seed, requests=args.requests, rate=args.rate, model=MODEL,
                           kv_tokens_per_backend=args.kv_blocks * 16)
    records = [dataclasses.replace(r, max_tokens=args.max_tokens) for r in generate(args.workload, opts)]
    tmp = Path(tempfile.mkdtemp(prefix="gravity-rtkv-"))
    redis = start_redis(tmp)
    started = [start_simulator(tmp, args.kv_blocks, args.time_scale) for _ in range(args.backends)]
    sims = [s for s, _ in started]
    backends = [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL], "kv_events": e}
                for i, (s, e) in enumerate(started)]
    policies: dict[str, dict[str, Any]] = {"approximate": {}, "precise": precise_routing()}
    # name -> (routing, gateway processes, shared_inflight settings)
    runs: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = {name: (r, 1, {}) for name, r in policies.items()}
    if args.replicas:
        n = args.replicas
        runs = {"precise": (precise_routing(), 1, {}),
                f"precise x{n} shared counts + pending": (precise_routing(), n, {}),
                f"precise x{n} shared counts": (precise_routing(), n, {"pending": False})}
        if args.own:
            runs[f"precise x{n} own"] = (precise_routing(), n, {"enabled": False})
    rows: list[dict[str, Any]] = []
    try:
        for policy in (["warmup"] if args.warmup else []) + list(runs):
            routing, n_gw, shared = runs.get(policy, ({"profiles": [{"name": "rr", "picker": "round-robin"}]}, 1, {}))
            # Idle keep-alive past the run: the client's pool reuses connections that sat idle while
            # the ramp was slow, and a server-side close racing that reuse is a ServerDisconnectedError.
            cfg = {"server": {"debug_headers": True, "read_timeout_s": args.max_s,
                              "limits": {"idle_timeout_s": 2 * args.max_s}},
                   "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0",
                             "shared_inflight": shared}, "backends": backends,
                   "routing": {**routing, "scrape_timeout_s": 2.0, "stale_after_s": 10.0}}
            gws = [start_gateway(tmp, cfg, timeout=90.0) for _ in range(n_gw)]
            try:
                bases = [f"http://127.0.0.1:{gw.port}" for gw in gws]
                if policy == "warmup":
                    try:
                        asyncio.run(replay(bases[0], sims, records[:args.warmup], args.time_scale, args.max_s))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        print(f"warm-up: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                wall = time.perf_counter()
                out = asyncio.run(spray(bases, sims, records, args.time_scale, args.max_s))
                wall = time.perf_counter() - wall
            finally:
                for gw in gws:
                    gw.stop()
            ttft = [o[0] for o in out]
            prompt, cached = sum(o[1] for o in out), sum(o[2] for o in out)
            rows.append({"policy": policy, "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
                         "ttft_p99": percentile(ttft, 99), "hit_rate": cached / prompt if prompt else 0.0,
                         "wall_s": wall})
            print(f"{policy:12s} done in {wall:.0f}s", file=sys.stderr, flush=True)
    finally:
        for p in (*sims, redis):
            p.stop()
    base_row = rows[0]
    print(f"{args.backends} h100-8b simulators ({args.kv_blocks} KV blocks, time scale {args.time_scale:g}) publishing "
          f"KV events, {args.requests} {args.workload} requests at {args.rate:g}/s (llm-d: ramping to it), "
          f"{args.max_tokens} output tokens")
    print(f"| policy | TTFT p50 s | TTFT p90 s | TTFT p99 s | hit rate | p90 vs {base_row['policy']} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['ttft_p99']:.3f} | "
              f"{r['hit_rate']:.3f} | {base_row['ttft_p90'] / r['ttft_p90']:.2f}x |")
    if args.eval:
        print("The same trace in the evaluator (virtual time, same engine profile and KV):")
        print("| policy | TTFT p50 s | TTFT p90 s | hit rate | p90 vs approximate |")
        print("|---|---|---|---|---|")
        ev = {name: _evaluate(records, name, args) for name in ("default", "precise")}
        for name, label in (("default", "approximate"), ("precise", "precise")):
            r = ev[name]
            print(f"| {label} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['hit_rate']:.3f} | "
                  f"{ev['default']['ttft_p90'] / r['ttft_p90']:.2f}x |")
            rows.append({"policy": f"eval-{label}", **{k: r[k] for k in ("ttft_p50", "ttft_p90", "hit_rate")}})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


async def spray(bases: list[str], sims: list[Proc], records: list[Any], time_scale: float,
                max_s: float) -> list[tuple[float, int, int, str]]:
    """`replay`, with request i sent to gateway i mod len(bases)."""
    if len(bases) == 1:
        return await replay(bases[0], sims, records, time_scale, max_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max_s)) as session:
        for s in sims:
            async with session.post(f"http://127.0.0.1:{s.port}/admin/reset") as r:
                r.raise_for_status()
        await asyncio.sleep(0.5)
        sem = asyncio.Semaphore(256)
        t0 = time.perf_counter()
        tasks = []
        for i, rec in enumerate(records):
            delay = rec.t / time_scale - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": MODEL, "messages": list(rec.messages), "max_tokens": rec.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            tasks.append(asyncio.create_task(one(session, bases[i % len(bases)], body, time_scale, sem)))
        return await asyncio.wait_for(asyncio.gather(*tasks), max_s)


def _evaluate(records: list[Any], policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from routing.eval.cluster import simulate
    from routing.eval.metrics import summarize
    from routing.eval.policies import policy_config
    from simulator.profiles import get_profile

    engine = get_profile("h100-8b", kv_blocks=args.kv_blocks)
    result = simulate(records, config=lambda reg: policy_config(policy, reg), engine=engine, backends=args.backends,
                      seed=args.seed, policy_name=policy)
    return summarize(result)


if __name__ == "__main__":
    raise SystemExit(main())
