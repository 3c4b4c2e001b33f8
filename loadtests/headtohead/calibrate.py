"""The evaluator's emulations against the real binaries: the same traces through `gravity eval`
(virtual time, same replicas and KV size) next to the real-time figures of a head-to-head report.

    .venv/bin/python loadtests/headtohead/calibrate.py [loadtests/results/headtohead/headtohead.json]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from traces import trace

from routing.eval.trace import write_trace

REPO = Path(__file__).resolve().parents[2]
# evaluator policy -> the real system it stands for
PAIRS = {"cache-aware": "vllm-router-ca", "round-robin": "vllm-router-rr", "default": "gravity"}


def evaluate(report: dict[str, Any], extra: list[str] | None = None) -> dict[str, Any]:
    rt = report["routing"]
    st = rt["settings"]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rt["workloads"]:
            path = Path(tmp) / f"{name}.jsonl"
            write_trace(path, trace(name, st["requests"], st["seed"], st["backends"], st["max_tokens"]))
            cmd = [sys.executable, "-m", "gateway", "eval", "--trace", str(path), "--backends", str(st["backends"]),
                   "--kv-blocks", str(st["kv_blocks"]), "--json", *(extra or [])]
            for policy in PAIRS:
                cmd += ["--policy", policy]
            got = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout)
            out[name] = {row["policy"]: row for row in got}
    return out


def table(report: dict[str, Any], virtual: dict[str, Any]) -> str:
    lines = [("| workload | policy (evaluator) vs real binary | TTFT p50 s virtual / real | TTFT p90 s virtual / real "
             "| hit rate virtual / real |"), "|---|---|---|---|---|"]
    for wl, rows in virtual.items():
        real_rows = report["routing"]["workloads"][wl]["systems"]
        for policy, system in PAIRS.items():
            v, r = rows.get(policy), real_rows.get(system)
            if not v or not r:
                continue
            lines.append(f"| {wl} | {policy} vs {system} | {v['ttft_p50']:.3f} / {r['ttft_p50']:.3f} | "
                         f"{v['ttft_p90']:.3f} / {r['ttft_p90']:.3f} | {v['hit_rate']:.3f} / {r['hit_rate']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else REPO / "loadtests" / "results" / "headtohead" / "headtohead.json"
    report = json.loads(path.read_text())
    virtual = evaluate(report)
    print(table(report, virtual))
    report["calibration"] = {"virtual": virtual}
    path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
