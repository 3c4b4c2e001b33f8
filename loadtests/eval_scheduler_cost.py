"""Benchmark: the default profile's per-request scheduling cost (schedule + observe) on the hot path.

8 endpoints, 4 KB and 32 KB prompts from 64 prefix groups (a warm prefix index), in-flight accounting
as the gateway does it. Prints microseconds per request, per plugin, against round-robin measured in
the same run, and, apart, what tokenizing the prompt would cost (the scheduler does not tokenize: it
hashes bytes and estimates tokens as bytes / 4).

Run: .venv/bin/python loadtests/eval_scheduler_cost.py [--requests 20000] [--prompt-bytes 4096 --prompt-bytes 32768]
     [--policy pl ...]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.config import RoutingConfig
from routing.datastore import Datastore
from routing.eval.policies import policy_config
from routing.plugins.registry import default_registry
from routing.scheduler import build_scheduler
from routing.types import EndpointMetrics, EndpointSpec, RoutingRequest
from simulator.tokenizer import encode

WORDS = b"the of and to in is that for it as was with be by on not".split()


def measure(cfg: RoutingConfig, prompts: list[bytes], endpoints: int) -> tuple[float, dict[str, float]]:
    ds = Datastore(lambda: 0.0)  # frozen clock: metrics stay fresh however long the run takes
    for i in range(endpoints):
        name = f"ep-{i}"
        ds.upsert(EndpointSpec(name, f"http://{name}", frozenset({"m"})))
        ds.update_metrics(name, EndpointMetrics(waiting=1, running=8, kv_usage=0.4, kv_capacity_tokens=491_520))
    scheduler = build_scheduler(cfg, ds, rng=random.Random(0))
    tickets = []
    per_plugin: dict[str, float] = {}
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        req = RoutingRequest(model="m", prompt=prompt, prompt_tokens=len(prompt) // 4, max_tokens=128, request_id=f"r{i}")
        decision = scheduler.schedule(req)
        scheduler.observe(req, decision.best.endpoint)
        tickets.append(ds.begin(decision.best.endpoint, decision.best.uncached_tokens, 128))
        if len(tickets) > 64:  # keep ~64 in flight, like a loaded gateway
            ds.end(tickets.pop(0))
        for k, v in decision.timings.items():
            per_plugin[k] = per_plugin.get(k, 0.0) + v
    elapsed = time.perf_counter() - started
    n = len(prompts)
    return elapsed / n * 1e6, {k: v / n * 1e6 for k, v in per_plugin.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--prompt-bytes", type=int, action="append", help="repeatable; default 4096 and 32768")
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--policy", action="append", default=[], help="more policies beside round-robin and default")
    args = ap.parse_args()
    registry = default_registry()
    for size in args.prompt_bytes or [4096, 32768]:
        rng = random.Random(1)

        def text(n: int, rng: random.Random = rng) -> bytes:
            out = b" ".join(rng.choice(WORDS) for _ in range(n // 3))
            return out[:n]

        groups = [text(size * 3 // 4) for _ in range(64)]
        prompts = [rng.choice(groups) + text(size // 4) for _ in range(args.requests)]
        results = {}
        for policy in ("round-robin", "default", *args.policy):
            results[policy] = measure(policy_config(policy, registry), prompts, args.endpoints)
        base = results["round-robin"][0]
        print(f"{args.endpoints} endpoints, {size}-byte prompts, {args.requests} requests "
              f"(schedule + observe + begin/end)")
        for policy, (us, plugins) in results.items():
            detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(plugins.items(), key=lambda kv: -kv[1]))
            scoring = sum(plugins.values())
            print(f"{policy:12s} {us:6.1f} us/request ({us / base:.1f}x round-robin), plugins {scoring:.1f} us; "
                  f"per plugin us: {detail}")
        sample = [p.decode() for p in prompts[:200]]
        started = time.perf_counter()
        for p in sample:
            encode(p)
        tok_us = (time.perf_counter() - started) / len(sample) * 1e6
        print(f"{'(tokenize)':12s} {tok_us:6.1f} us/request: o200k tiktoken of the same prompt, not done by the "
              "scheduler (reported apart)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
