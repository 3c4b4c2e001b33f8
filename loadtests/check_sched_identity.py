"""Check that a change to the scheduler's implementation changed no decision: this tree against a git revision.

Both trees run the same cases in their own process (``PYTHONHASHSEED=0``) and print a digest per case;
the script compares them and names the first request that differs.

- **eval**: the six named workloads, small (200 requests), seeds 1-3, on 4 and 8 h100-8b backends with
  a small KV (900 blocks: engines and the prefix index evict), at ~80 % of the recorded capacity
  (docs/routing-results-8b.json, halved for 4 backends). Compared: every request's endpoint, cached
  tokens and TTFT, so a pick that differs anywhere shows.
- **direct**: the scheduler driven alone over a datastore whose scrapes, health, LoRA adapters,
  sessions and in-flight counts change between decisions (4 and 8 endpoints, 1 KB-32 KB prompts from
  shared groups). Compared: the whole ranking, each total score and per-scorer score bit for bit,
  each candidate's uncached tokens, and the prefix producer's output (match, home, share).

Run: .venv/bin/python loadtests/check_sched_identity.py [--against main] [--quick]
A different policy than the default profile: --policy NAME (an evaluator policy, routing/eval/policies.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("shared-prefix", "multi-turn", "hot-prefix", "long-doc-qa", "no-sharing", "llm-d")
# Requests per second at ~80 % of 8 h100-8b backends' capacity (docs/routing-results-8b.json).
RATE_8 = {"shared-prefix": 58.0, "multi-turn": 98.6, "hot-prefix": 98.6, "long-doc-qa": 98.6,
          "no-sharing": 26.2, "llm-d": 12.3}
SOURCES = ("routing", "simulator", "policies", "config/tiktoken")  # what the cases import (and the tokenizer)


def _eval_cases(policy: str, quick: bool) -> dict[str, Any]:
    from routing.eval.cluster import simulate
    from routing.eval.policies import policy_config
    from routing.eval.workloads import WorkloadOptions, generate
    from simulator.profiles import get_profile

    out: dict[str, Any] = {}
    engine = get_profile("h100-8b", kv_blocks=900)
    for backends in (4, 8):
        for wl in WORKLOADS:
            for seed in (1,) if quick else (1, 2, 3):
                records = generate(wl, WorkloadOptions(seed=seed, requests=60 if quick else 200,
                                                       rate=RATE_8[wl] * backends / 8,
                                                       kv_tokens_per_backend=engine.kv_blocks * engine.block_size))
                result = simulate(records, config=lambda reg, p=policy: policy_config(p, reg), engine=engine,
                                  backends=backends, seed=seed, policy_name=policy)
                out[f"eval {wl} seed={seed} backends={backends}"] = [
                    [r.endpoint, r.cached_tokens, r.shed, None if r.ttft is None else r.ttft.hex()]
                    for r in result.requests]
    return out


def _direct_cases(policy: str, quick: bool) -> dict[str, Any]:
    import random

    from routing.datastore import Datastore
    from routing.errors import RoutingError
    from routing.eval.policies import policy_config
    from routing.plugins.registry import default_registry
    from routing.scheduler import build_scheduler
    from routing.types import EndpointMetrics, EndpointSpec, RoutingRequest

    words = b"the of and to in is that for it as was with be by on not".split()
    out: dict[str, Any] = {}
    for endpoints in (4, 8):
        for size in (1024, 4096, 32768):
            rng = random.Random(size * 10 + endpoints)
            now = [0.0]
            ds = Datastore(lambda now=now: now[0], stale_after_s=2.0)
            names = [f"ep-{i}" for i in range(endpoints)]
            for name in names:
                ds.upsert(EndpointSpec(name, f"http://{name}", frozenset({"m"})))
            ds.set_models(names[0], {"m"}, {"ad-1", "ad-2"})
            scheduler = build_scheduler(policy_config(policy, default_registry()), ds, rng=random.Random(7),
                                        clock=lambda now=now: now[0])

            def text(n: int, rng: random.Random = rng) -> bytes:
                return b" ".join(rng.choice(words) for _ in range(n // 3 + 1))[:n]

            groups = [text(size * 3 // 4) for _ in range(12)]
            sessions: dict[str, str] = {}
            tickets: list[Any] = []
            rows: list[Any] = []
            for i in range(150 if quick else 600):
                now[0] += rng.expovariate(40.0)
                if i % 25 == 0 or rng.random() < 0.05:  # a scrape of one endpoint
                    name = rng.choice(names)
                    ds.update_metrics(name, EndpointMetrics(
                        waiting=rng.randrange(6), running=rng.randrange(16), kv_usage=rng.choice([None, rng.random()]),
                        kv_capacity_tokens=rng.choice([None, 20_000, 491_520]),
                        loras_running=frozenset({"ad-1"} if rng.random() < 0.3 else ()), max_loras=rng.randrange(3)))
                if rng.random() < 0.02:
                    ds.set_healthy(rng.choice(names), rng.random() < 0.6, "probe")
                if rng.random() < 0.01:
                    ds.on_restart(rng.choice(names))
                prompt = (rng.choice(groups) + text(size // 4)) if rng.random() < 0.8 else text(rng.randrange(8, size))
                session = f"s{rng.randrange(20)}" if rng.random() < 0.3 else None
                req = RoutingRequest(
                    model="m", prompt=prompt, prompt_tokens=len(prompt) // 4, max_tokens=rng.randrange(16, 256),
                    request_id=f"r{i}", session_id=session, session_endpoint=sessions.get(session or ""),
                    lora="ad-1" if rng.random() < 0.05 else None, cache_salt="t1" if rng.random() < 0.1 else None)
                try:
                    d = scheduler.schedule(req)
                except RoutingError as exc:
                    rows.append(["error", type(exc).__name__])
                    continue
                best = d.best.endpoint
                scheduler.observe(req, best)
                if session:
                    sessions[session] = best
                p = d.prefix
                rows.append([[[c.endpoint, c.score.hex(), c.uncached_tokens,
                               sorted((k, v.hex()) for k, v in c.scores.items())] for c in d.ranked],
                             None if p is None else [sorted((k, v.hex()) for k, v in p.cached.items()), p.home,
                                                     p.share.hex()]])
                tickets.append(ds.begin(best, d.best.uncached_tokens, req.max_tokens))
                while len(tickets) > rng.randrange(4, 40):
                    t = tickets.pop(rng.randrange(len(tickets)))
                    if rng.random() < 0.7:
                        ds.first_token(t)
                    ds.end(t)
                if rng.random() < 0.3 and tickets:
                    ds.first_token(rng.choice(tickets))
            out[f"direct size={size} endpoints={endpoints}"] = rows
    return out


def _emit(policy: str, quick: bool) -> None:
    import routing

    cases = {**_direct_cases(policy, quick), **_eval_cases(policy, quick)}
    json.dump({"root": str(Path(routing.__file__).resolve().parents[1]), "cases": cases}, sys.stdout)


def _run(root: Path, policy: str, quick: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
    argv = [sys.executable, str(Path(__file__).resolve()), "--emit", "--policy", policy, *(["--quick"] if quick else [])]
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{root}: the cases failed:\n{done.stderr[-3000:]}")
    emitted = json.loads(done.stdout)
    if Path(emitted["root"]) != root.resolve():
        raise SystemExit(f"the cases imported routing from {emitted['root']}, not {root}")
    return emitted["cases"]


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return f"[{i}]: {json.dumps(x)[:400]} != {json.dumps(y)[:400]}"
        return f"lengths {len(a)} != {len(b)}"
    return f"{json.dumps(a)[:400]} != {json.dumps(b)[:400]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="main", help="git revision of the reference (default: main)")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter cases (~1/10 of the time)")
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit:
        _emit(args.policy, args.quick)
        return 0
    with tempfile.TemporaryDirectory(prefix="sched-identity-") as tmp:
        ref = Path(tmp)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.against, *SOURCES],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        print(f"reference: {args.against} ({subprocess.run(['git', '-C', str(REPO), 'rev-parse', '--short', args.against], capture_output=True, text=True, check=True).stdout.strip()}); "
              f"this tree: {REPO}", flush=True)
        want = _run(ref, args.policy, args.quick)
    got = _run(REPO, args.policy, args.quick)
    bad = 0
    for case, expected in want.items():
        actual = got.get(case)
        decisions = len(expected)
        if actual == expected:
            print(f"same  {case}: {decisions} decisions")
        else:
            bad += 1
            print(f"DIFF  {case}: first difference at {_first_difference(expected, actual)}")
    print(f"{len(want) - bad} of {len(want)} cases identical" + ("" if bad else ": no decision changed"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
