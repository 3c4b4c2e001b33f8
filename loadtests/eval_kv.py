"""Evaluator runs for KV-event routing: approximate (default) vs precise vs oracle on the same traces.

Per workload, fleet size (4, 8) and load (70/80/90 % of the capacity measured in docs/routing-results*.json),
plus precise with 3 gateway replicas (own in-flight counts) for the active-active bound. Writes
docs/kv-events-results.json and prints a table; ``--traces DIR`` adds JSONL traces run at their own rate.

Run: .venv/bin/python loadtests/eval_kv.py --jobs 2 [--quick] [--traces /tmp/issue14-traces]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.eval.cluster import simulate
from routing.eval.kv_feed import KVFeedOptions
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config
from routing.eval.trace import read_trace
from routing.eval.workloads import WorkloadOptions, generate
from simulator.profiles import get_profile

DOCS = Path(__file__).resolve().parents[1] / "docs"
OUT = DOCS / "kv-events-results.json"
# name -> (requests, kv_blocks override), as loadtests/eval_compare.py runs them.
WORKLOADS: dict[str, tuple[int, int | None]] = {
    "llm-d": (1200, 4096),
    "long-doc-qa": (400, None),
    "multi-turn": (600, None),
    "shared-prefix": (1024, None),
    "no-sharing": (1000, None),
}
POLICIES = ("default", "precise", "oracle")
LOADS = (0.7, 0.8, 0.9)


def _capacity(workload: str, backends: int) -> float:
    path = DOCS / ("routing-results.json" if backends == 4 else f"routing-results-{backends}b.json")
    data = json.loads(path.read_text())
    return float(data["capacity"][workload]["rate"]) / float(data["load"])


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    engine = get_profile("h100-8b", kv_blocks=job["kv_blocks"], seed=job["seed"])
    if job.get("trace"):
        records = read_trace(job["trace"])
    else:
        opts = WorkloadOptions(seed=job["seed"], requests=job["requests"], rate=job["rate"],
                               kv_tokens_per_backend=engine.kv_blocks * engine.block_size)
        records = generate(job["workload"], opts)
    policy = job["policy"]
    feed = KVFeedOptions(delay_s=job.get("delay", 0.005), mode="tokens") if policy == "precise" else None
    result = simulate(records, config=lambda reg: policy_config(policy, reg), engine=engine,
                      backends=job["backends"], seed=job["seed"], policy_name=policy, kv_feed=feed,
                      replicas=job.get("replicas", 1))
    s = summarize(result)
    label = policy if job.get("replicas", 1) == 1 else f"{policy}x{job['replicas']}"
    return {**{k: s[k] for k in ("ttft_p50", "ttft_p90", "ttft_p99", "hit_rate", "completed", "shed")},
            "policy": label, "workload": job["workload"], "backends": job["backends"], "load": job.get("load"),
            "rate": job["rate"], "wall_s": round(time.perf_counter() - started, 1)}


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for backends in args.backends:
        for workload, (requests, kv) in WORKLOADS.items():
            if args.workload and workload not in args.workload:
                continue
            cap = _capacity(workload, backends)
            requests = requests // 4 if args.quick else requests
            for load in args.loads:
                base = {"workload": workload, "backends": backends, "load": load, "rate": round(cap * load, 4),
                        "requests": requests, "kv_blocks": kv, "seed": args.seed}
                out += [{**base, "policy": p} for p in POLICIES]
                if not args.no_replicas:
                    out.append({**base, "policy": "precise", "replicas": 3})
                    out.append({**base, "policy": "default", "replicas": 3})
        for trace in sorted(Path(args.traces).glob("*.jsonl")) if args.traces else []:
            base = {"workload": trace.stem, "backends": backends, "load": None, "rate": None, "trace": str(trace),
                    "requests": None, "kv_blocks": args.trace_kv_blocks, "seed": args.seed}
            if backends != 4 and "-8b" not in trace.stem:
                continue
            if backends == 4 and "-8b" in trace.stem:
                continue
            out += [{**base, "policy": p} for p in POLICIES]
            out.append({**base, "policy": "precise", "replicas": 3})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backends", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--loads", type=float, nargs="+", default=list(LOADS))
    ap.add_argument("--workload", action="append")
    ap.add_argument("--no-replicas", action="store_true", help="skip the 3-replica runs")
    ap.add_argument("--traces", help="directory of JSONL traces (name-8b.jsonl for the 8-backend runs)")
    ap.add_argument("--trace-kv-blocks", type=int, default=2500)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    todo = jobs(args)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_one, todo):  # in order; the file grows as rows finish
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            Path(args.out).write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1) + "\n")
    cols = ("workload", "backends", "load", "policy", "ttft_p50", "ttft_p90", "ttft_p99", "hit_rate", "wall_s")
    print("  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
