"""Benchmark: the default profile's per-request scheduling cost (schedule + observe) on the hot path.

8 endpoints, 4 KB and 32 KB prompts from 64 prefix groups (a warm prefix index), in-flight accounting
as the gateway does it. Prints microseconds per request, per plugin, against round-robin measured in
the same run, and, apart, what tokenizing the prompt would cost (the scheduler does not tokenize: it
hashes bytes and estimates tokens as bytes / 4).

Run: .venv/bin/python loadtests/eval_scheduler_cost.py [--requests 20000] [--prompt-bytes 4096 --prompt-bytes 32768]
     [--policy pl ...]
     .venv/bin/python loadtests/eval_scheduler_cost.py --instructions [--requests 2000]

``--instructions`` counts instructions per request under callgrind instead (the figure that does not move
with the neighbours on a shared machine): the same loop, counted from request ``--warmup`` on (the
prefix index is warm then), and apart, the prefix block hashing of the same prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.config import RoutingConfig
from routing.datastore import Datastore
from routing.eval.policies import policy_config
from routing.plugins.registry import default_registry
from routing.prefix import ApproxPrefixIndex
from routing.scheduler import build_scheduler
from routing.types import EndpointMetrics, EndpointSpec, RoutingRequest
from simulator.tokenizer import encode

WORDS = b"the of and to in is that for it as was with be by on not".split()


def measure(cfg: RoutingConfig, prompts: list[bytes], endpoints: int, warmup: int = 0,
            counting: Callable[[bool], None] | None = None) -> tuple[float, dict[str, float]]:
    """Microseconds per request and per plugin over ``prompts[warmup:]`` (the first ones warm the index);
    ``counting(True/False)`` is called around the measured part."""
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
        if i == warmup:
            per_plugin.clear()
            if counting is not None:
                counting(True)
            started = time.perf_counter()
        req = RoutingRequest(model="m", prompt=prompt, prompt_tokens=len(prompt) // 4, max_tokens=128, request_id=f"r{i}")
        decision = scheduler.schedule(req)
        scheduler.observe(req, decision.best.endpoint)
        tickets.append(ds.begin(decision.best.endpoint, decision.best.uncached_tokens, 128))
        if len(tickets) > 64:  # keep ~64 in flight, like a loaded gateway
            ds.end(tickets.pop(0))
        for k, v in decision.timings.items():
            per_plugin[k] = per_plugin.get(k, 0.0) + v
    elapsed = time.perf_counter() - started
    if counting is not None:
        counting(False)
    n = len(prompts) - warmup
    return elapsed / n * 1e6, {k: v / n * 1e6 for k, v in per_plugin.items()}


def hashing(prompts: list[bytes], warmup: int = 0, counting: Callable[[bool], None] | None = None) -> float:
    """Microseconds per request of the default prefix index's block hashing alone, over the same prompts."""
    index = ApproxPrefixIndex(256, 512, lambda _: 31_250)
    reqs = [RoutingRequest(model="m", prompt=p, prompt_tokens=len(p) // 4, max_tokens=128, request_id=f"r{i}")
            for i, p in enumerate(prompts)]
    for req in reqs[:warmup]:
        index.hashes(req)
    if counting is not None:
        counting(True)
    started = time.perf_counter()
    for req in reqs[warmup:]:
        index.hashes(req)
    elapsed = time.perf_counter() - started
    if counting is not None:
        counting(False)
    return elapsed / max(1, len(reqs) - warmup) * 1e6


def make_prompts(size: int, n: int) -> list[bytes]:
    """``n`` prompts of ``size`` bytes: 3/4 one of 64 shared prefixes, 1/4 the request's own."""
    rng = random.Random(1)

    def text(k: int) -> bytes:
        return b" ".join(rng.choice(WORDS) for _ in range(k // 3))[:k]

    groups = [text(size * 3 // 4) for _ in range(64)]
    return [rng.choice(groups) + text(size // 4) for _ in range(n)]


_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)


def _control(flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(os.getpid())], check=True, capture_output=True, timeout=300)


def _counted_child(args: argparse.Namespace) -> int:
    """Under callgrind (instrumentation off at start): one dump per counted region, labels on stdout."""

    def counting(on: bool) -> None:
        _control("--instr=on" if on else "--instr=off")
        if not on:
            _control("--dump")

    registry = default_registry()
    labels = []
    for size in args.prompt_bytes or [4096, 32768]:
        prompts = make_prompts(size, args.warmup + args.requests)
        for policy in ("round-robin", "default", *args.policy):
            measure(policy_config(policy, registry), prompts, args.endpoints, args.warmup, counting)
            labels.append([size, policy])
        hashing(prompts, args.warmup, counting)
        labels.append([size, "(hashing)"])
    print(json.dumps(labels))
    return 0


def instructions(args: argparse.Namespace) -> int:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    argv = [sys.argv[0], "--counted-child", "--requests", str(args.requests), "--warmup", str(args.warmup),
            "--endpoints", str(args.endpoints)]
    for size in args.prompt_bytes or []:
        argv += ["--prompt-bytes", str(size)]
    for policy in args.policy:
        argv += ["--policy", policy]
    with tempfile.TemporaryDirectory(prefix="sched-cost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               sys.executable, *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        labels = json.loads(done.stdout.strip().splitlines()[-1])
        dumps = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        counts = [int(_TOTALS.findall(d.read_bytes())[-1]) for d in dumps]
    if len(counts) != len(labels):
        print(f"expected {len(labels)} dumps, got {len(counts)}", file=sys.stderr)
        return 1
    by_size: dict[int, dict[str, float]] = {}
    for (size, label), total in zip(labels, counts, strict=True):
        by_size.setdefault(size, {})[label] = total / args.requests
    for size, rows in by_size.items():
        base = rows["round-robin"]
        print(f"{args.endpoints} endpoints, {size}-byte prompts, {args.requests} requests after {args.warmup} warm-up "
              "(schedule + observe + begin/end), instructions per request under callgrind")
        for label, per in rows.items():
            print(f"{label:12s} {per / 1e3:8.1f} k instr/request ({per / base:.2f}x round-robin)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=None, help="default 20,000; 2,000 with --instructions")
    ap.add_argument("--prompt-bytes", type=int, action="append", help="repeatable; default 4096 and 32768")
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--policy", action="append", default=[], help="more policies beside round-robin and default")
    ap.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    ap.add_argument("--warmup", type=int, default=None, help="requests before measuring (default 0; 500 counted)")
    ap.add_argument("--counted-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    counted = args.instructions or args.counted_child
    args.requests = args.requests or (2_000 if counted else 20_000)
    args.warmup = args.warmup if args.warmup is not None else (500 if counted else 0)
    if args.counted_child:
        return _counted_child(args)
    if args.instructions:
        return instructions(args)
    registry = default_registry()
    for size in args.prompt_bytes or [4096, 32768]:
        prompts = make_prompts(size, args.warmup + args.requests)
        results = {}
        for policy in ("round-robin", "default", *args.policy):
            results[policy] = measure(policy_config(policy, registry), prompts, args.endpoints, args.warmup)
        base = results["round-robin"][0]
        print(f"{args.endpoints} endpoints, {size}-byte prompts, {args.requests} requests "
              f"(schedule + observe + begin/end)")
        for policy, (us, plugins) in results.items():
            detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(plugins.items(), key=lambda kv: -kv[1]))
            scoring = sum(plugins.values())
            print(f"{policy:12s} {us:6.1f} us/request ({us / base:.1f}x round-robin), plugins {scoring:.1f} us; "
                  f"per plugin us: {detail}")
        print(f"{'(hashing)':12s} {hashing(prompts, args.warmup):6.1f} us/request: the prefix index's block hashes "
              "of the same prompts alone (part of the default's prefix plugin)")
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
