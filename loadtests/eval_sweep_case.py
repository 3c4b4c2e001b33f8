"""Look inside one sweep case: per-endpoint load and where each policy's slowest requests went.

Run: .venv/bin/python loadtests/eval_sweep_case.py --seed 12 --load 0.95 [--out .gravity/sweep] [--policy P ...]
(the rate is the case's capacity from the sweep's cache times --load, or --rate)
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.eval.cluster import simulate
from routing.eval.generators import generate_spec
from routing.eval.metrics import summarize
from routing.eval.sweep import PolicyRef, Store, run_requests
from routing.eval.sweep_space import draw_case


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--load", type=float, default=0.95)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--out", default=".gravity/sweep")
    ap.add_argument("--policy", action="append")
    ap.add_argument("--config", help="routing YAML; its --profile joins the policies")
    ap.add_argument("--profile", action="append", default=[])
    args = ap.parse_args()
    case = draw_case(args.seed)
    rate = args.rate
    if rate is None:
        caps = [c for c in Store(args.out).capacities().values() if c["case"] == case.key]
        if not caps:
            print(f"no capacity cached for {case.key}; pass --rate", file=sys.stderr)
            return 2
        rate = args.load * caps[0]["rate"]
    print(case.key, case.summary())
    print(f"rate {rate:.3f}/s, fleet {list(zip(case.fleet.profiles, case.fleet.kv_tokens, strict=True))}")
    records = generate_spec(case.workload, rate, case.seed, requests=run_requests(case, rate))
    refs = [PolicyRef(p, p) for p in (args.policy or ["default", "cache-aware", "least-request"])]
    refs += [PolicyRef(p, config_path=args.config, profile=p) for p in args.profile if args.config]
    engines = case.fleet.engines(case.seed)
    for ref in refs:
        result = simulate(records, config=ref.config, engine=engines, seed=case.seed, policy_name=ref.label)
        s = summarize(result)
        rs = result.requests
        slow = sorted(range(len(rs)), key=lambda i: -(rs[i].ttft or 0.0))[: max(1, len(rs) // 10)]
        slow_at = collections.Counter(rs[i].endpoint for i in slow)
        print(f"\n{ref.label}: p50 {s['ttft_p50']:.3f} p90 {s['ttft_p90']:.3f} p99 {s['ttft_p99']:.3f} "
              f"hit {s['hit_rate']:.3f} makespan {result.makespan:.1f} s")
        sessions_moved = 0
        last: dict[str, str] = {}
        for r, rec in zip(rs, records, strict=True):
            if rec.session:
                if rec.session in last and last[rec.session] != r.endpoint:
                    sessions_moved += 1
                last[rec.session] = r.endpoint
        print(f"  session moves {sessions_moved}; slowest 10 %: arrivals {min(rs[i].arrival for i in slow):.1f}-"
              f"{max(rs[i].arrival for i in slow):.1f} s, mean uncached "
              f"{sum(rs[i].prompt_tokens - rs[i].cached_tokens for i in slow) / len(slow):.0f} tokens")
        for i, ep in enumerate(result.endpoints):
            print(f"  {ep.name} {case.fleet.profiles[i]:8s} kv {case.fleet.kv_tokens[i]:>7d}: {ep.requests:4d} req, "
                  f"prefill {ep.prefill_tokens:>8d} tok, busy {ep.busy_s / max(1e-9, result.makespan):.2f}, "
                  f"slow {slow_at.get(ep.name, 0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
