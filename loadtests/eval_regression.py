"""Regression points: the six named workloads at their recorded load, for a candidate default profile.

Runs each named workload on the two recorded fleets, at the rate recorded there (no capacity search):
8 h100-8b backends at 80 % of capacity (docs/routing-results-8b.json, ``loadtests/eval_compare.py``) and
the mixed fleet at 85 % (loadtests/results/mixed_fleet.jsonl, ``loadtests/eval_mixed.py``). The
baselines' TTFT p90 come from those same files (seed 1, the same traces), and the given policies run
again here; a candidate must beat every baseline where the default did.

Run: nice -n 19 .venv/bin/python loadtests/eval_regression.py [--policy default] [--config my.yaml --profile p]
     [--workload llm-d ...] [--fleet 8b|mixed]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.eval_compare import WORKLOADS as COMPARE_WORKLOADS
from loadtests.eval_compare import _make
from loadtests.eval_mixed import WORKLOADS as MIXED_WORKLOADS
from loadtests.eval_mixed import _records, fleet
from routing.eval.cluster import simulate
from routing.eval.metrics import summarize
from routing.eval.sweep import PolicyRef
from simulator.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("round-robin", "least-request", "cache-aware")


def _recorded_8b() -> dict[str, dict[str, Any]]:
    data = json.loads((ROOT / "docs" / "routing-results-8b.json").read_text())
    out: dict[str, dict[str, Any]] = {}
    for row in data["rows"]:
        entry = out.setdefault(row["workload"], {"rate": row["rate"], "p90": {}})
        entry["p90"][row["policy"]] = row["ttft_p90"]
    return out


def _recorded_mixed() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in (ROOT / "loadtests" / "results" / "mixed_fleet.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("quick"):
            out[row["workload"]] = {"rate": row["rate"], "p90": {p: s["ttft_p90"] for p, s in row["policies"].items()}}
    return out


def run(fleet_name: str, wl: str, rate: float, refs: list[PolicyRef]) -> dict[str, dict[str, float]]:
    if fleet_name == "8b":
        n, kv = COMPARE_WORKLOADS[wl]
        engine = get_profile("h100-8b", kv_blocks=kv)
        records = _make(wl, n, engine.kv_blocks * engine.block_size, rate)
        engines = [engine] * 8
    else:
        n, kv = MIXED_WORKLOADS[wl]
        engines = fleet(kv)
        records = _records(wl, n, engines[0].kv_blocks * engines[0].block_size, rate, 1)
    out = {}
    for ref in refs:
        s = summarize(simulate(records, config=ref.config, engine=engines, backends=len(engines), seed=1,
                               policy_name=ref.label))
        out[ref.label] = {"p90": float(s["ttft_p90"]), "p99": float(s["ttft_p99"]), "hit": float(s["hit_rate"])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", default=[], help="evaluator policy (repeatable; default: default)")
    ap.add_argument("--config", help="routing YAML whose --profile entries also run")
    ap.add_argument("--profile", action="append", default=[])
    ap.add_argument("--workload", action="append", help="only these (repeatable)")
    ap.add_argument("--fleet", action="append", choices=("8b", "mixed"), help="default: both")
    args = ap.parse_args()
    refs = [PolicyRef(p, p) for p in (args.policy or (["default"] if not args.profile else []))]
    refs += [PolicyRef(p, config_path=args.config, profile=p) for p in args.profile]
    print("| fleet | workload | rate | " + " | ".join(f"{b} p90" for b in BASELINES) + " | "
          + " | ".join(f"{r.label} p90 (p99, hit)" for r in refs) + " |")
    print("|---|---|---|" + "---|" * (len(BASELINES) + len(refs)))
    for fleet_name in args.fleet or ["8b", "mixed"]:
        recorded = _recorded_8b() if fleet_name == "8b" else _recorded_mixed()
        for wl, rec in recorded.items():
            if args.workload and wl not in args.workload:
                continue
            got = run(fleet_name, wl, rec["rate"], refs)
            best = min(rec["p90"][b] for b in BASELINES)
            cells = [f"{rec['p90'][b]:.3f}" for b in BASELINES]
            cells += [f"{'**' if got[r.label]['p90'] < best else ''}{got[r.label]['p90']:.3f}"
                      f"{'**' if got[r.label]['p90'] < best else ''} ({got[r.label]['p99']:.2f}, "
                      f"{got[r.label]['hit']:.3f})" for r in refs]
            print(f"| {fleet_name} | {wl} | {rec['rate']:.2f} | " + " | ".join(cells) + " |", flush=True)
    print("bold: below every baseline's p90 (baselines as recorded, seed 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
