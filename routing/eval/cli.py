"""``gravity eval``: replay a trace or built-in workload through a routing policy in virtual time.

``main(argv) -> int`` is what the gateway CLI dispatches to; it prints a table or JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from routing.config import RoutingConfig, load_routing_config
from routing.eval.cluster import simulate
from routing.eval.faults import fault_summary, parse_fault, read_trace_with_faults
from routing.eval.kv_feed import KVFeedOptions
from routing.eval.metrics import summarize
from routing.eval.policies import KV_FEED_POLICIES, POLICIES, policy_config
from routing.eval.trace import write_trace
from routing.eval.workloads import WORKLOADS, WorkloadOptions, generate
from routing.plugins.registry import Registry
from simulator.profiles import get_profile, profile_names

__all__ = ["build_parser", "main"]

_COLUMNS = ("policy", "ttft_p50", "ttft_p90", "ttft_p99", "e2e_p90", "output_tok_s", "hit_rate",
            "imbalance_requests", "preemptions", "shed")
_FAULT_COLUMNS = ("resume", "completed", "failed", "truncated", "retried", "resumed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gravity eval", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="JSON Lines trace to replay")
    src.add_argument("--workload", choices=sorted(WORKLOADS), help="built-in workload")
    src.add_argument("--sweep", action="store_true",
                     help="robustness sweep over generated cases (`gravity eval --sweep --help`)")
    p.add_argument("--requests", type=int, help="workload size (default: the workload's own)")
    p.add_argument("--rate", type=float, help="workload arrival rate, requests/s")
    p.add_argument("--write-trace", metavar="FILE", help="also write the generated workload as a trace")
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--engine-profile", default="h100-8b", choices=profile_names())
    p.add_argument("--kv-blocks", type=int, help="override the engine's KV blocks (16 tokens each)")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument("--policy", action="append", help=f"one of {', '.join(POLICIES)}; repeatable")
    pol.add_argument("--config", help="routing YAML (bare or under a `routing:` key)")
    p.add_argument("--profile", help="profile of --config to use (default: its default profile)")
    p.add_argument("--scrape-interval", type=float, default=0.1, help="seconds between metric scrapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-delay", type=float, default=0.005, help="KV event delivery delay, s (precise policies)")
    p.add_argument("--kv-loss", type=float, default=0.0, help="fraction of KV event batches lost")
    p.add_argument("--kv-no-replay", action="store_true", help="lost batches resync instead of being replayed")
    p.add_argument("--replicas", type=int, default=1, help="gateway replicas (own in-flight counts), round-robin")
    p.add_argument("--fault", action="append", default=[], metavar="JSON",
                   help='a fault event, e.g. \'{"t": 30, "fault": "kill", "endpoint": 1}\' (repeatable; '
                        'traces may hold them too: routing/eval/faults.py)')
    p.add_argument("--resume", choices=["on", "off", "both"], default="on",
                   help="with faults: resume broken streams on another replica (both: one row each)")
    p.add_argument("--stall-timeout", type=float, help="with faults: the gateway's stall timeout, s (default 60)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if key.startswith(("ttft", "e2e", "hit", "imb")) else f"{value:.0f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:
        from routing.eval import sweep_cli  # its options differ; matplotlib and the pool load only here

        return sweep_cli.main(argv)
    args = build_parser().parse_args(argv)
    engine = get_profile(args.engine_profile, kv_blocks=args.kv_blocks, seed=args.seed)
    try:
        faults = [parse_fault(f) for f in args.fault]
        if args.trace:
            records, traced = read_trace_with_faults(args.trace)
            faults = sorted([*traced, *faults], key=lambda f: f.t)
        else:
            options = WorkloadOptions(seed=args.seed, requests=args.requests, rate=args.rate,
                                      kv_tokens_per_backend=engine.kv_blocks * engine.block_size)
            records = generate(args.workload, options)
        if args.write_trace:
            write_trace(args.write_trace, records)
        runs: list[tuple[str, Any]] = []
        if args.config:
            path = args.config
            runs.append((args.profile or "config", lambda reg, path=path: _config(path, reg)))
        for name in args.policy or ([] if args.config else ["default"]):
            if name not in POLICIES:
                raise ValueError(f"unknown policy '{name}'; choose from {', '.join(POLICIES)}")
            runs.append((name, lambda reg, name=name: policy_config(name, reg)))
        summaries = []
        resilience = None
        if args.stall_timeout is not None:
            from policies.resilience import ResilienceConfig

            resilience = ResilienceConfig.model_validate({"timeouts": {"stall_s": args.stall_timeout}})
        resumes = {"on": [True], "off": [False], "both": [True, False]}[args.resume] if faults else [True]
        for (label, config), resume in ((run, r) for run in runs for r in resumes):
            mode = KV_FEED_POLICIES.get(label)
            feed = None if mode is None else KVFeedOptions(delay_s=args.kv_delay, loss=args.kv_loss,
                                                            replay=not args.kv_no_replay, mode=mode,  # type: ignore[arg-type]
                                                            seed=args.seed)
            result = simulate(records, config=config, engine=engine, backends=args.backends,
                              profile=args.profile if label != "default" and args.config else None,
                              seed=args.seed, scrape_interval_s=args.scrape_interval, policy_name=label,
                              kv_feed=feed, replicas=args.replicas, faults=faults or None,
                              resilience=resilience, resume=resume)
            summary = summarize(result)
            if faults:
                summary.update(fault_summary(result), resume=resume)
            summaries.append(summary)
    except (OSError, ValueError) as exc:
        print(f"gravity eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        columns = _COLUMNS + (_FAULT_COLUMNS if faults else ())
        print("  ".join(f"{c:>12}" for c in columns))
        for s in summaries:
            print("  ".join(f"{_fmt(c, s[c]):>12}" for c in columns))
    return 0


def _config(path: str, registry: Registry) -> RoutingConfig:
    return load_routing_config(path, registry)


if __name__ == "__main__":
    raise SystemExit(main())
