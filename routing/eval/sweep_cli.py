"""``gravity eval --sweep``: the robustness sweep's command line (run, resume, report, plot).

Seeds 1-100 are the tuning split, 101-200 the held-out split (``--held-out``); ``--quick`` is 20 small cases.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from routing.eval.policies import POLICIES
from routing.eval.sweep import CapacityMethod, Store, SweepOptions, parse_seeds, policy_refs, run_sweep
from routing.eval.sweep_report import build_report, plot_ratios
from routing.eval.sweep_space import HELD_OUT_SEEDS, LOADS, RANGES, TUNING_SEEDS, draw_case

__all__ = ["build_parser", "main"]

DEFAULT_POLICIES = ("default", "round-robin", "least-request", "cache-aware")
QUICK_SEEDS = "1-20"
QUICK_REQUESTS = 200
QUICK_METHOD = CapacityMethod(seeds=1, steps=5, probe_seconds=10.0, probe_max_requests=600)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gravity eval --sweep", description=__doc__)
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--seeds", help="cases to run, e.g. 1-100 (default: the tuning split 1-100)")
    split.add_argument("--held-out", action="store_true", help="the held-out split, seeds 101-200")
    p.add_argument("--quick", action="store_true", help=f"seeds {QUICK_SEEDS} (unless --seeds), {QUICK_REQUESTS} "
                   "requests a run, a cheaper capacity search (cached apart from the full sweep's)")
    p.add_argument("--policy", action="append", help=f"repeatable; default: {', '.join(DEFAULT_POLICIES)} "
                   f"(known: {', '.join(POLICIES)})")
    p.add_argument("--config", help="routing YAML whose profiles (--profile) join the policies")
    p.add_argument("--profile", action="append", default=[], help="profile of --config (repeatable)")
    p.add_argument("--loads", default=",".join(str(x) for x in LOADS), help="fractions of capacity")
    p.add_argument("--jobs", type=int, default=1, help="cases run in parallel processes")
    p.add_argument("--nice", type=int, default=0, help="raise the workers' niceness by this much")
    p.add_argument("--budget-min", type=float, help="start no new case after this many minutes")
    p.add_argument("--out", default=".gravity/sweep", help="results directory (resumable cache)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report what the cache holds")
    p.add_argument("--target", default="default", help="policy the goals and worst cases are about")
    p.add_argument("--png", help="write the ratio plot here (default: OUT/sweep.png)")
    p.add_argument("--write-report", metavar="FILE", help="also write the printed report to FILE")
    p.add_argument("--json", metavar="FILE", help="write a compact per-run table (p90/p99/hit per policy)")
    p.add_argument("--describe", action="store_true", help="print the parameter ranges and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.describe:
        print(f"tuning seeds {TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1}, "
              f"held-out seeds {HELD_OUT_SEEDS.start}-{HELD_OUT_SEEDS.stop - 1}")
        for k, v in RANGES.items():
            print(f"{k:>10}: {v}")
        return 0
    try:
        default_seeds = (QUICK_SEEDS if args.quick else f"{TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1}")
        text = args.seeds or (f"{HELD_OUT_SEEDS.start}-{HELD_OUT_SEEDS.stop - 1}" if args.held_out else default_seeds)
        seeds = parse_seeds(text)
        requests, method = (QUICK_REQUESTS, QUICK_METHOD) if args.quick else (None, CapacityMethod())
        loads = tuple(float(x) for x in args.loads.split(","))
        names = args.policy or ([] if args.config else list(DEFAULT_POLICIES))
        unknown = [n for n in names if n not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policy '{unknown[0]}'; choose from {', '.join(POLICIES)}")
        refs = policy_refs(names, args.config, args.profile)
        digests = {r.label: r.digest() for r in refs}
    except (OSError, ValueError) as exc:
        print(f"gravity eval --sweep: {exc}", file=sys.stderr)
        return 2
    opts = SweepOptions(seeds=seeds, policies=refs, loads=loads, requests=requests, method=method,
                        jobs=args.jobs, budget_s=None if args.budget_min is None else args.budget_min * 60,
                        nice=args.nice)
    store = Store(args.out)
    started = time.monotonic()
    if args.report_only:
        cases = [draw_case(s, requests=requests) for s in seeds]
    else:
        cases = run_sweep(opts, store, progress=lambda m: print(m, flush=True))
        print(f"sweep: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    report = build_report(cases, store.runs(), digests, loads, target=args.target, requested=len(seeds))
    text = report.text()
    print(text)
    if args.write_report:
        Path(args.write_report).write_text(text + "\n")
    if report.runs:
        png = args.png or str(Path(args.out) / "sweep.png")
        plot_ratios(report, png)
        print(f"plot: {png}")
    if args.json:
        rows = [{"case": r.case.key, "load": r.load, "kind": r.case.summary(),
                 **{p: [s["p90"], s["p99"], s["hit"]] for p, s in r.by_policy.items()}} for r in report.runs]
        Path(args.json).write_text(json.dumps({"policies": digests, "runs": rows}, separators=(",", ":")) + "\n")
    return 0
