"""llm-d's benchmark condition in the evaluator: load at and past the measured capacity.

llm-d ramps its benchmark until the cache-blind and approximate schedulers queue; eval_kv.py stays at
70-90 % of the oracle's capacity. This runs one case at multiples of that capacity for one policy and
prints TTFT p50/p90/p99, hit rate and backlog growth (> 0.05: not keeping up) as one JSON line.

Run: nice -n 15 .venv/bin/python loadtests/eval_kv_overload.py llm-d 8 default 1.3 2   (case backends policy load seed)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_kv as E

from routing.eval.capacity import backlog_growth
from routing.eval.cluster import simulate
from routing.eval.kv_feed import KVFeedOptions
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config


def main() -> int:
    case, backends, policy, load, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    c = E.CASES[case]
    cap = E._capacity(case, backends)
    if cap is None:
        raise SystemExit(f"{case}/{backends}: no capacity; run eval_kv.py --measure-capacity")
    records = E._records(c, cap * load, seed)
    feed = KVFeedOptions(delay_s=0.005, mode="tokens") if policy == "precise" else None
    r = simulate(records, config=lambda reg: policy_config(policy, reg), engine=E._engine(c, seed),
                 backends=backends, seed=seed, policy_name=policy, kv_feed=feed)
    s = summarize(r)
    print(json.dumps({"case": case, "backends": backends, "policy": policy, "load": load, "seed": seed,
                      "rate": cap * load, "p50": round(s["ttft_p50"], 3), "p90": round(s["ttft_p90"], 3),
                      "p99": round(s["ttft_p99"], 3), "hit": round(s["hit_rate"], 3),
                      "growth": round(backlog_growth(r), 4)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
