"""The hold phase alone (N streams held open at once), for Gravity on several server/client stacks,
interleaved rounds in one run, the upstream measured directly each round for the baseline.

    .venv/bin/python loadtests/headtohead/hold_stacks.py --rounds 3 --streams 1000

Stacks: `fast+raw` (the default), `uvicorn+aiohttp` (the old one) and the two crossings, so a
regression can be put on the server or on the client. Figures: hold.HoldSample.summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MODEL, cpu_seconds, free_port, stack
from hold import hold
from overhead import start_proc, wait_answers
from stream_client import build_request

STACKS = {"fast+raw": ("fast", "raw"), "fast+aiohttp": ("fast", "aiohttp"),
          "uvicorn+raw": ("uvicorn", "raw"), "uvicorn+aiohttp": ("uvicorn", "aiohttp")}


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--interval-ms", type=float, default=500.0)
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--extra-yaml", default="", help="YAML lines appended to every Gravity config")
    ap.add_argument("--output", default="")
    args = ap.parse_args()
    names = args.stacks.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    with stack() as s:
        a, b = free_port(), free_port()
        s.start("direct", [sys.executable, str(Path(__file__).with_name("sse_upstream.py")), "--port", str(a),
                           "--port", str(b), "--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)], a)
        ports = {"direct": a}
        for name in names:
            engine, client = STACKS[name]
            port = free_port()
            backends = "".join(f'  - {{name: w{i}, url: "http://127.0.0.1:{p}", kind: vllm, models: [{MODEL}]}}\n'
                               for i, p in enumerate((a, b)))
            cfg = (f"server: {{host: 127.0.0.1, port: {port}, read_timeout_s: 600, engine: {engine}, "
                   f"upstream_client: {client}}}\n"
                   f"state: {{embedded_dir: {json.dumps(str(s.tmp / f'redis-{port}'))}}}\n"
                   f"backends:\n{backends}{args.extra_yaml}")
            path = s.tmp / f"gravity-{port}.yaml"
            path.write_text(cfg)
            start_proc(s, name, [sys.executable, "-m", "gateway", "serve", "--config", str(path)], port,
                       dict(os.environ))
            ports[name] = port
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": args.chunks, "stream": True}).encode()
        for port in ports.values():
            wait_answers(port, body)
        request = build_request(MODEL, args.chunks)
        ramp, stream_s = 2.0, args.chunks * args.interval_ms / 1000
        for r in range(args.rounds):
            for name, port in ports.items():
                pid = s.pids[name]
                before = cpu_seconds(pid)
                sample = asyncio.run(hold(port, args.streams, request, args.chunks,
                                          deadline_s=ramp + stream_s * 3 + 30, ramp_s=ramp))
                if sample.chunks:
                    sample.cpu_us_per_chunk = (cpu_seconds(pid) - before) / sample.chunks * 1e6
                sm = sample.summary(args.interval_ms, full_from_s=ramp + args.interval_ms / 1000, full_until_s=stream_s)
                full_until = stream_s
                phases = {"ramp": [g for t, g in sample.gaps if t < ramp + args.interval_ms / 1000],
                          "full": [g for t, g in sample.gaps if ramp + args.interval_ms / 1000 <= t < full_until],
                          "ending": [g for t, g in sample.gaps if t >= full_until]}
                sm["phases"] = {k: {"gaps": len(v), "added_p99_ms": _p99(v) - args.interval_ms}
                                for k, v in phases.items()}
                results.setdefault(name, []).append(sm)
                print(f"round {r + 1} {name:16} {sm['completed']}/{args.streams} added p50 {sm['added_p50_ms']:6.2f} "
                      f"p99 {sm['added_p99_ms']:7.2f} ms  ttfb p50 {sm['ttfb_p50_ms']:7.1f} p99 {sm['ttfb_p99_ms']:7.1f} ms "
                      f"p99 by phase {[(k, v['gaps'], round(v['added_p99_ms'], 1)) for k, v in sm['phases'].items()]} "
                      f"cpu {sm['cpu_us_per_chunk'] or 0:5.1f} us/chunk errors {sm['errors']}", flush=True)
    print("\nmedian over rounds (added = gap - interval; ratio = system / direct's p99 same round):")
    for name, rows in results.items():
        p99 = statistics.median(x["added_p99_ms"] for x in rows)
        p50 = statistics.median(x["added_p50_ms"] for x in rows)
        by_phase = {k: round(statistics.median(x["phases"][k]["added_p99_ms"] for x in rows), 2)
                    for k in rows[0]["phases"]}
        print(f"  {name:16} added p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  ttfb p99 "
              f"{statistics.median(x['ttfb_p99_ms'] for x in rows):7.1f} ms  p99 by phase {by_phase}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
