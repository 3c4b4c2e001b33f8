"""Regression point "mixed-fleet": the six named workloads on one pool of h100-8b and a100-8b replicas, one of
them with half its KV, at a fraction of each workload's measured capacity; does the default beat every
baseline on TTFT p90 there?

Fleet (4 backends): h100-8b, h100-8b with half the KV, a100-8b, a100-8b (the named workloads' KV overrides
apply per replica, halved for the second). Capacity per workload is the higher of cache-aware's and
least-request's (fixed baselines, as in the sweep: tuning the default cannot move the load level), by
routing/eval/capacity.py's backlog-growth bisection. Rows are appended to ``--out`` as each workload
finishes, so an interrupted run keeps what it measured.

Run: nice -n 19 .venv/bin/python loadtests/eval_mixed.py [--load 0.85] [--workload llm-d ...] [--quick]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Runnable as a plain script from anywhere: the repo root holds routing/ and simulator/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.config import RoutingConfig
from routing.eval.capacity import measure_capacity
from routing.eval.cluster import simulate
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config
from routing.eval.workloads import WorkloadOptions, generate
from routing.plugins.registry import Registry
from simulator.engine import EngineConfig
from simulator.profiles import get_profile

OUT = Path(__file__).resolve().parent / "results" / "mixed_fleet.jsonl"
BASELINES = ("round-robin", "least-request", "cache-aware")
POLICIES = ("default", *BASELINES)
CAPACITY_POLICIES = ("cache-aware", "least-request")
# name -> (requests, kv_blocks override), as loadtests/eval_compare.py runs them.
# In the order run: the working-set cases first, in case the run is cut short.
WORKLOADS: dict[str, tuple[int, int | None]] = {
    "llm-d": (1200, 4096),
    "long-doc-qa": (400, None),
    "shared-prefix": (1024, None),
    "multi-turn": (600, None),
    "hot-prefix": (1000, None),
    "no-sharing": (1000, None),
}
FLEET = ("h100-8b", "h100-8b", "a100-8b", "a100-8b")
HALF_KV = 1  # index of the replica with half the KV
PROBE_SECONDS = 30.0


def fleet(kv_blocks: int | None) -> list[EngineConfig]:
    out = []
    for i, name in enumerate(FLEET):
        blocks = kv_blocks if kv_blocks is not None else get_profile(name).kv_blocks
        out.append(get_profile(name, kv_blocks=blocks // 2 if i == HALF_KV else blocks))
    return out


def _policy(name: str, registry: Registry) -> RoutingConfig:
    return policy_config(name, registry)


def _records(wl: str, n: int, kv_tokens: int, rate: float, seed: int) -> list[Any]:
    return generate(wl, WorkloadOptions(seed=seed, requests=n, rate=rate, kv_tokens_per_backend=kv_tokens))


def run_workload(wl: str, *, load: float, quick: bool) -> dict[str, Any]:
    n, kv = WORKLOADS[wl]
    n = n // 4 if quick else n
    engines = fleet(kv)
    # llm-d sizes its working set from one replica's KV: the median replica's (the full-KV ones).
    kv_tokens = engines[0].kv_blocks * engines[0].block_size

    def probe(rate: float, seed: int) -> list[Any]:
        return _records(wl, max(n, math.ceil(rate * PROBE_SECONDS)), kv_tokens, rate, seed)

    started = time.process_time()
    caps: dict[str, float] = {}
    for p in CAPACITY_POLICIES:
        caps[p] = measure_capacity(probe, config=functools.partial(_policy, p), engine=engines, backends=len(engines),
                                   lo=1.0, hi=128.0, steps=4 if quick else 7, seeds=(1,) if quick else (1, 2)).rate
    rate = load * max(caps.values())
    records = _records(wl, n, kv_tokens, rate, 1)
    by_policy: dict[str, dict[str, float]] = {}
    for p in POLICIES:
        s = summarize(simulate(records, config=functools.partial(_policy, p), engine=engines, backends=len(engines),
                               seed=1, policy_name=p))
        by_policy[p] = {k: round(float(s[k]), 4) for k in ("ttft_p50", "ttft_p90", "ttft_p99", "hit_rate")}
    best = min(BASELINES, key=lambda b: by_policy[b]["ttft_p90"])
    return {"workload": wl, "load": load, "quick": quick, "fleet": [*FLEET], "half_kv": HALF_KV,
            "capacity": {k: round(v, 3) for k, v in caps.items()}, "rate": round(rate, 3), "policies": by_policy,
            "best_baseline": best, "default_vs_best_baseline_p90": round(
                by_policy["default"]["ttft_p90"] / max(1e-9, by_policy[best]["ttft_p90"]), 3),
            "cpu_s": round(time.process_time() - started, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | rate req/s | " + " | ".join(f"{p} p90 s" for p in POLICIES)
             + " | default / best baseline | beats every baseline |", "|---|---|" + "---|" * (len(POLICIES) + 2)]
    for r in rows:
        pol = r["policies"]
        lines.append(f"| {r['workload']} | {r['rate']:.2f} | " + " | ".join(f"{pol[p]['ttft_p90']:.3f}" for p in POLICIES)
                     + f" | {r['default_vs_best_baseline_p90']:.2f}x ({r['best_baseline']}) | "
                     + ("yes" if r["default_vs_best_baseline_p90"] < 1 else "no") + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=float, default=0.85, help="fraction of the measured capacity")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="only these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests, a cheaper capacity search")
    ap.add_argument("--out", default=str(OUT), help="JSON Lines file the rows are appended to")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for wl in args.workload or list(WORKLOADS):
        row = run_workload(wl, load=args.load, quick=args.quick)
        rows.append(row)
        with out.open("a") as fh:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        pol = row["policies"]
        print(f"{wl}: rate {row['rate']:.2f}/s " + " ".join(f"{p} {pol[p]['ttft_p90']:.3f}" for p in POLICIES)
              + f" ({row['cpu_s']:.0f} s CPU)", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
