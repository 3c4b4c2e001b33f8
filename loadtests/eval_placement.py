"""Placement analysis: where each policy put each prefix group, and how many requests paid a full prefill.

For workloads built from a shared system prompt per group (shared-prefix, llm-d, long-doc-qa, hot-prefix), it
prints, per policy: TTFT p90/p99, the cluster hit rate, how many (group, endpoint) placements there were (the
number of groups means each group lived on one replica only), the distinct groups each endpoint served, and the
requests that had less than half their prompt cached (they pay a near-full prefill, so if they are more than
10 % of the trace they set the p90 for every policy).

Run: .venv/bin/python loadtests/eval_placement.py --workload llm-d --backends 8 --kv-blocks 4096 \
         --requests 1200 --rate 8.08 --policy default --policy cache-aware --policy oracle
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.eval.cluster import ClusterResult, simulate
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config
from routing.eval.trace import TraceRecord
from routing.eval.workloads import WorkloadOptions, generate
from simulator.profiles import get_profile


def group_of(record: TraceRecord) -> str:
    """The prefix group: the system message (chat workloads) or the prompt's first 512 characters."""
    if record.messages:
        return record.messages[0]["content"][:512]
    return (record.prompt or "")[:512]


@dataclass(frozen=True)
class Placement:
    groups: int
    placements: int
    groups_per_endpoint: list[int]
    requests_per_endpoint: list[int]
    mostly_uncached: int


def placement(records: list[TraceRecord], result: ClusterResult) -> Placement:
    holders: dict[str, set[str]] = defaultdict(set)
    groups_on: dict[str, set[str]] = defaultdict(set)
    full = 0
    for record, rec in zip(records, result.requests, strict=True):
        if not rec.endpoint:
            continue
        group = group_of(record)
        holders[group].add(rec.endpoint)
        groups_on[rec.endpoint].add(group)
        if rec.prompt_tokens and rec.cached_tokens < rec.prompt_tokens / 2:
            full += 1
    return Placement(
        groups=len(holders),
        placements=sum(len(h) for h in holders.values()),
        groups_per_endpoint=sorted(len(g) for g in groups_on.values()),
        requests_per_endpoint=sorted(Counter(r.endpoint for r in result.requests if r.endpoint).values()),
        mostly_uncached=full,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="llm-d")
    ap.add_argument("--backends", type=int, default=8)
    ap.add_argument("--kv-blocks", type=int, help="override the engine's KV blocks (16 tokens each)")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", action="append")
    args = ap.parse_args()
    engine = get_profile("h100-8b", kv_blocks=args.kv_blocks)
    kv_tokens = engine.kv_blocks * engine.block_size
    records = generate(args.workload, WorkloadOptions(seed=args.seed, requests=args.requests, rate=args.rate,
                                                      kv_tokens_per_backend=kv_tokens))
    print(f"{args.workload}: {len(records)} requests, {args.backends} backends, "
          f"{kv_tokens} KV tokens per backend, seed {args.seed}")
    for policy in args.policy or ["default", "cache-aware", "oracle"]:
        result = simulate(records, config=functools.partial(policy_config, policy), engine=engine,
                          backends=args.backends, seed=args.seed, policy_name=policy)
        s = summarize(result)
        p = placement(records, result)
        print(f"{policy:14s} p90 {s['ttft_p90']:.3f} p99 {s['ttft_p99']:.3f} hit {s['hit_rate']:.3f} | "
              f"{p.groups} groups, {p.placements} placements, groups per endpoint {p.groups_per_endpoint}, "
              f"requests per endpoint {p.requests_per_endpoint}, "
              f"mostly uncached {p.mostly_uncached} ({p.mostly_uncached / len(records):.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
