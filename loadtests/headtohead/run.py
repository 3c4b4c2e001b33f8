"""Head-to-head: Gravity against vllm-router, SMG and LiteLLM's proxy, in one process tree and one run.

    .venv/bin/python loadtests/headtohead/run.py --quick          # a few minutes, for development
    .venv/bin/python loadtests/headtohead/run.py                  # both parts, full size
    .venv/bin/python loadtests/headtohead/run.py --part overhead  # or --part routing

The peers come from PyPI, pinned, each in its own venv under .gravity/headtohead/ (created on first
use). Needs nginx and wrk from Debian (installed with apt-get when missing). Everything listens on 127.0.0.1, every
phase is bounded in time, every process is stopped at exit. Results: loadtests/results/headtohead/headtohead.json
(figures, exact commands, machine load), tables on stdout, PNG plots in docs/ with --plots.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, _busy_processes, _machine, stack
from peers import PINS, SYSTEMS, ensure_venv

RESULTS = REPO / "loadtests" / "results" / "headtohead" / "headtohead.json"


def _commit() -> str:
    """The checkout Gravity runs from: its commit, marked when the gateway's files differ from it."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "routing", "policies"],
                           check=False, capture_output=True, text=True, cwd=REPO).stdout.strip()
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("overhead", "routing", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="1 round x 2 s, short traces: a smoke run")
    ap.add_argument("--systems", default=",".join(n for n in SYSTEMS if n != "gravity-base"),
                    help=f"comma list of {', '.join(SYSTEMS)} (gravity-base: GRAVITY_BASE=<checkout>)")
    g = ap.add_argument_group("overhead")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--seconds", type=float, default=5.0)
    g.add_argument("--connections", type=int, default=32)
    g.add_argument("--stream-connections", type=int, default=32)
    g.add_argument("--chunks", type=int, default=32, help="SSE chunks per streamed response")
    g.add_argument("--interval-ms", type=float, default=10.0, help="upstream gap between SSE chunks")
    g.add_argument("--hold-streams", type=int, default=1000,
                   help="streams held open at once through each system (0: skip that phase)")
    g.add_argument("--hold-chunks", type=int, default=40, help="SSE chunks per held stream")
    g.add_argument("--hold-interval-ms", type=float, default=500.0, help="upstream gap between a held stream's chunks")
    r = ap.add_argument_group("routing")
    r.add_argument("--backends", type=int, default=4)
    r.add_argument("--time-scale", type=float, default=1.0, help="simulator speed-up (checked: keep_up)")
    r.add_argument("--kv-blocks", type=int, default=2000,
                   help="KV blocks per replica (16 tokens each): 32k tokens, below every workload's working set")
    r.add_argument("--workloads", default="shared-prefix,multi-turn,agent-loop,long-doc-qa,no-sharing")
    r.add_argument("--requests", type=int, default=320, help="requests per workload")
    r.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--sim-source", type=Path, default=REPO,
                   help="checkout whose simulator runs the replicas (to measure another version's lag)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
        args.hold_streams, args.hold_chunks, args.hold_interval_ms = min(args.hold_streams, 200), 16, 250.0
        args.requests = min(args.requests, 80)
        args.workloads = ",".join(args.workloads.split(",")[:2]) if args.workloads == ap.get_default("workloads") \
            else args.workloads
    systems = [x for x in args.systems.split(",") if x]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}")

    for peer in sorted({SYSTEMS[x].peer for x in systems if SYSTEMS[x].peer}):
        ensure_venv(peer)  # type: ignore[arg-type]
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "loadtests/headtohead/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "pins": PINS, "machine": _machine(), "busy_processes_at_start": _busy_processes(),
        "load_average_at_start": os.getloadavg(), "gravity_commit": _commit(),
    }
    if args.part in ("overhead", "all"):
        import overhead
        import tools
        found = tools.ensure(("nginx", "wrk"))
        nginx, wrk = found["nginx"], found["wrk"]
        with stack() as s:
            report["overhead"] = overhead.run(
                s, systems, wrk=wrk, nginx=nginx, rounds=args.rounds, seconds=args.seconds,
                connections=args.connections, stream_connections=args.stream_connections, chunks=args.chunks,
                interval_ms=args.interval_ms, hold_streams=args.hold_streams, hold_chunks=args.hold_chunks,
                hold_interval_ms=args.hold_interval_ms)
        report["overhead"]["settings"] = {"rounds": args.rounds, "seconds": args.seconds,
                                          "connections": args.connections,
                                          "stream_connections": args.stream_connections}
        report["overhead"]["load_average_1m_at_end"] = os.getloadavg()[0]
        report["overhead"]["gravity_commit"] = report["gravity_commit"]
        report["overhead"]["date"] = report["date"]
    if args.part in ("routing", "all"):
        import routing_part
        with stack() as s:
            report["routing"] = routing_part.run(
                s, systems, backends=args.backends, time_scale=args.time_scale, kv_blocks=args.kv_blocks,
                workloads=args.workloads.split(","), requests=args.requests, max_tokens=args.max_tokens,
                seed=args.seed, sim_source=args.sim_source.resolve())
        report["routing"]["load_average_1m_at_end"] = os.getloadavg()[0]
        report["routing"]["gravity_commit"] = report["gravity_commit"]
        report["routing"]["date"] = report["date"]
    import tables
    print(tables.render(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.exists() and args.part != "all":
        # A part run on its own keeps the other part's last figures.
        old = json.loads(args.output.read_text())
        for key in ("overhead", "routing", "calibration"):
            if key not in report and key in old:
                report[key] = old[key]
                report[key].setdefault("gravity_commit", old.get("gravity_commit"))
                report[key].setdefault("date", old.get("date"))
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    if args.plots:
        import plots
        for path in plots.write(report, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
