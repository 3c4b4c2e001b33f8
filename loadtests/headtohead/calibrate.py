"""The evaluator's emulations against the real binaries: the same traces through `gravity eval`
(virtual time, same replicas and KV size) next to the real-time figures of a head-to-head report.

    .venv/bin/python loadtests/headtohead/calibrate.py [loadtests/results/headtohead/headtohead.json]

`cache-aware` runs twice: as the sweep's baseline uses it (defaults: a prefix miss goes to the
smallest tree, SGLang's rule) and with `low_match: least-load` (vllm-router 0.1.17's prefix_miss
path: the worker with the fewest in-flight requests). The table also gives what the real system
added before its requests reached an engine (client TTFT minus the engines' own, means), which
the evaluator does not model: for vllm-router that includes rendering every request on every worker.
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
# evaluator policy (or calibrated variant) -> the real system it stands for
PAIRS = {"cache-aware": "vllm-router-ca", "cache-aware (low_match: least-load)": "vllm-router-ca",
         "round-robin": "vllm-router-rr", "default": "gravity"}
VARIANTS = {"cache-aware (low_match: least-load)": {"type": "cache-aware", "name": "ca",
                                                    "params": {"low_match": "least-load"}}}


def _eval(cmd: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return list(json.loads(done.stdout))


def evaluate(report: dict[str, Any], extra: list[str] | None = None) -> dict[str, Any]:
    rt = report["routing"]
    st = rt["settings"]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rt["workloads"]:
            path = Path(tmp) / f"{name}.jsonl"
            write_trace(path, trace(name, st["requests"], st["seed"], st["backends"], st["max_tokens"]))
            base = [sys.executable, "-m", "gateway", "eval", "--trace", str(path), "--backends", str(st["backends"]),
                    "--kv-blocks", str(st["kv_blocks"]), "--json", *(extra or [])]
            cmd = list(base)
            for policy in PAIRS:
                if policy not in VARIANTS:
                    cmd += ["--policy", policy]
            rows = {row["policy"]: row for row in _eval(cmd)}
            for label, plugin in VARIANTS.items():
                cfg = Path(tmp) / "variant.yaml"
                cfg.write_text(json.dumps({"plugins": [plugin], "profiles": [{"name": "v", "picker": plugin["name"]}]}))
                rows[label] = _eval([*base, "--config", str(cfg)])[0]
            out[name] = rows
    return out


def table(report: dict[str, Any], virtual: dict[str, Any]) -> str:
    lines = [("| workload | evaluator policy vs real binary | TTFT p50 s virtual / real | TTFT p90 s virtual / real "
              "| TTFT p99 s virtual / real | hit rate virtual / real | real: added before the engine, mean ms |"),
             "|---|---|---|---|---|---|---|"]
    for wl, rows in virtual.items():
        real_rows = report["routing"]["workloads"][wl]["systems"]
        for policy, system in PAIRS.items():
            v, r = rows.get(policy), real_rows.get(system)
            if not v or not r:
                continue
            added = r.get("added_ttft_mean")
            lines.append(f"| {wl} | {policy} vs {system} | {v['ttft_p50']:.3f} / {r['ttft_p50']:.3f} | "
                         f"{v['ttft_p90']:.3f} / {r['ttft_p90']:.3f} | {v['ttft_p99']:.3f} / {r['ttft_p99']:.3f} | "
                         f"{v['hit_rate']:.3f} / {r['hit_rate']:.3f} | "
                         f"{'-' if added is None else format(added * 1000, '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else REPO / "loadtests" / "results" / "headtohead" / "headtohead.json"
    report = json.loads(path.read_text())
    virtual = evaluate(report)
    print(table(report, virtual))
    report["calibration"] = {"virtual": virtual, "pairs": PAIRS, "variants": VARIANTS}
    path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
