"""Benchmark: every routing policy on every built-in workload in virtual time; writes a table and a TTFT-CDF plot.

Each workload first gets its cluster capacity (the highest arrival rate the oracle or round-robin
sustains, found by bisection) and is then run at ``--load`` (default 80 %) of it.

Run: .venv/bin/python loadtests/eval_compare.py [--quick] [--load 0.8]   (docs/routing-results.{json,md,png})
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

# Runnable as a plain script from anywhere: the repo root holds routing/ and simulator/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from routing.config import RoutingConfig
from routing.eval.capacity import measure_capacity
from routing.eval.cluster import simulate
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config
from routing.eval.workloads import WorkloadOptions, generate
from routing.plugins.registry import Registry
from simulator.profiles import get_profile

DOCS = Path(__file__).resolve().parents[1] / "docs"
POLICIES = ("default", "round-robin", "random", "least-request", "cache-aware", "oracle")
# name -> (requests, kv_blocks override); the rate comes from the capacity search.
WORKLOADS: dict[str, tuple[int, int | None]] = {
    "shared-prefix": (1024, None),
    "multi-turn": (600, None),
    "hot-prefix": (1000, None),
    "long-doc-qa": (400, None),
    "no-sharing": (1000, None),
    "llm-d": (600, 4096),  # KV scaled to 65k tokens/replica so the 6x working set stays small
}
CAPACITY_POLICIES = ("oracle", "round-robin")  # cluster capacity: the better of the two


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests")
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--out", default=str(DOCS))
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity to offer")
    ap.add_argument("--workload", action="append", help="only these workloads (repeatable)")
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    capacities: dict[str, dict[str, float]] = {}
    cdfs: dict[str, dict[str, list[float]]] = {}
    for wl, (n, kv) in WORKLOADS.items():
        if args.workload and wl not in args.workload:
            continue
        engine = get_profile("h100-8b", kv_blocks=kv)
        n = n // 4 if args.quick else n
        make = functools.partial(_make, wl, n, engine.kv_blocks * engine.block_size)
        cap = {p: measure_capacity(make, config=functools.partial(_policy, p), engine=engine, backends=args.backends,
                                   lo=0.5, hi=64.0, steps=7, seed=1).rate for p in CAPACITY_POLICIES}
        rate = args.load * max(cap.values())
        capacities[wl] = {**cap, "rate": rate}
        print(f"{wl}: capacity {', '.join(f'{p} {r:.2f}/s' for p, r in cap.items())}; running at {rate:.2f}/s",
              flush=True)
        records = make(rate)
        for policy in POLICIES:
            started = time.perf_counter()
            result = simulate(records, config=functools.partial(_policy, policy), engine=engine,
                              backends=args.backends, seed=1, policy_name=policy)
            s = summarize(result)
            s["workload"] = wl
            s["rate"] = rate
            s["wall_s"] = time.perf_counter() - started
            rows.append(s)
            cdfs.setdefault(wl, {})[policy] = sorted(r.ttft for r in result.requests if r.ttft is not None)
            print(f"{wl:14s} {policy:14s} p90 {s['ttft_p90']:.3f} p99 {s['ttft_p99']:.3f} "
                  f"hit {s['hit_rate']:.3f} ({s['wall_s']:.1f}s)", flush=True)
    (out / "routing-results.json").write_text(json.dumps({"load": args.load, "capacity": capacities, "rows": rows},
                                                         indent=1))
    (out / "routing-results.md").write_text(_capacity_table(capacities, args.load) + "\n" + _table(rows))
    _plot(cdfs, out / "routing-ttft-cdf.png")
    return 0


def _policy(name: str, registry: Registry) -> RoutingConfig:
    return policy_config(name, registry)


def _make(wl: str, n: int, kv_tokens: int, rate: float) -> list[Any]:
    return generate(wl, WorkloadOptions(seed=1, requests=n, rate=rate, kv_tokens_per_backend=kv_tokens))


def _capacity_table(caps: dict[str, dict[str, float]], load: float) -> str:
    header = (f"| workload | capacity under oracle req/s | under round-robin req/s | "
              f"run at ({load:.0%} of the higher) req/s |")
    lines = [header, "|---|---|---|---|"]
    for wl, c in caps.items():
        lines.append(f"| {wl} | {c['oracle']:.2f} | {c['round-robin']:.2f} | {c['rate']:.2f} |")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("| workload | policy | TTFT p50 s | p90 s | p99 s | e2e p90 s | out tok/s | hit rate | imbalance | "
              "preempt | shed | p90 vs RR |")
    lines = [header, "|" + "---|" * 12]
    rr = {r["workload"]: r["ttft_p90"] for r in rows if r["policy"] == "round-robin"}
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['policy']} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['ttft_p99']:.3f} "
            f"| {r['e2e_p90']:.2f} | {r['output_tok_s']:.0f} | {r['hit_rate']:.3f} | {r['imbalance_requests']:.2f} "
            f"| {r['preemptions']} | {r['shed']} | {rr[r['workload']] / r['ttft_p90']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def _plot(cdfs: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (wl, by_policy) in zip(axes.flat, cdfs.items(), strict=False):
        for policy, values in by_policy.items():
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.plot(values, ys, label=policy, linewidth=2.2 if policy == "default" else 1.2)
        ax.set_xscale("log")
        ax.set_title(wl)
        ax.set_xlabel("TTFT (s, log)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("TTFT CDF per policy, 4 simulated h100-8b backends (virtual time)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
