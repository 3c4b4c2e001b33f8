"""What traces cost: the gateway with tracing off, on at 100% and at 10% sampling, in one run.

    .venv/bin/python loadtests/bench_tracing.py             # ~3 minutes; needs nginx and wrk
    apt-get install -y nginx-light wrk                      # Debian packages it uses

nginx serves the static completion and is also the "collector" (`POST /v1/traces` answered 200 and
discarded), so the spans really leave the process over OTLP/HTTP. Targets, measured in interleaved
rounds at 32 connections and at 1:

- `baseline`: the gateway from the commit before tracing existed (a `git archive` of --baseline-ref),
  so "off costs nothing measurable" is a comparison, not a claim;
- `off`: this checkout, no endpoint configured (the no-op path);
- `on-100`: every request sampled, exported by the event-loop processor (the default);
- `on-10`: parentbased_traceidratio 0.1;
- `thread-100`: every request sampled, exported by the SDK's BatchSpanProcessor (`processor: thread`).

Prints req/s, p50 and CPU per request for each, the ratios against `off`, the spans each gateway
exported and dropped, and writes loadtests/results/tracing.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import start_gateway
from harness import (
    COMPLETION,
    INSTALL_HINT,
    METRICS,
    MODELS,
    NGINX_CONF,
    REPO,
    REQUEST,
    WRK_LUA,
    Sample,
    Stack,
    _busy_processes,
    _machine,
    _median,
    free_port,
    measure,
    run_rounds,
    stack,
)

RESULTS = REPO / "loadtests" / "results" / "tracing.json"
TARGET_COST = 0.15
"""100% sampling may cost at most this share of the throughput."""


def start_upstream_and_collector(s: Stack, nginx: str) -> int:
    port = free_port()
    conf = NGINX_CONF.replace("location = /health", "location = /v1/traces {{ return 200 ''; }}\n"
                              "        location = /health")
    (s.tmp / "nginx.conf").write_text(conf.format(tmp=s.tmp, port=port, completion=COMPLETION, models=MODELS,
                                                  metrics=METRICS))
    s.start("nginx", [nginx, "-c", str(s.tmp / "nginx.conf"), "-p", str(s.tmp), "-e",
                      str(s.tmp / "nginx-error.log")], port)
    return port


def baseline_checkout(s: Stack, ref: str) -> Path:
    out = s.tmp / "baseline-src"
    out.mkdir()
    blob = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out


def default_baseline() -> str:
    """The parent of the commit that added gateway/telemetry."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "gateway/telemetry/__init__.py"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("no commit adds gateway/telemetry: give --baseline-ref")
    return f"{added[-1]}^"


def span_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"exported": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("gravity_trace_spans_exported_total"):
            out["exported"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gravity_trace_spans_dropped_total"):
            out["dropped"] += float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets; medians are reported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--baseline-ref", default=None, help="git ref of the pre-tracing gateway (default: the "
                        "parent of the commit that added gateway/telemetry); 'none' to skip it")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 120:
        parser.error("--rounds must be 1..20 and --seconds 1..120")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    wrk = shutil.which("wrk")
    if not nginx or not wrk:
        print(INSTALL_HINT.format(what="nginx and wrk"), file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    machine, busy = _machine(), _busy_processes()
    results: dict[str, dict[str, Sample]] = {}
    spans: dict[str, dict[str, float]] = {}
    with stack() as s:
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()))
        upstream = start_upstream_and_collector(s, nginx)
        collector = f"http://127.0.0.1:{upstream}"
        # Every export of a run's spans reaches the collector within the measurement (100 ms batches).
        batch = "batch: {schedule_delay_ms: 100}"
        variants = {
            "off": "",
            "on-100": f"telemetry: {{endpoint: \"{collector}\", {batch}}}\n",
            "on-10": f"telemetry: {{endpoint: \"{collector}\", sampler: parentbased_traceidratio, "
                     f"sampler_arg: 0.1, {batch}}}\n",
            "thread-100": f"telemetry: {{endpoint: \"{collector}\", processor: thread, {batch}}}\n",
        }
        targets: dict[str, int] = {}
        ref = args.baseline_ref or default_baseline()
        if ref != "none":
            targets["baseline"], _ = start_gateway(s, upstream, "baseline", baseline_checkout(s, ref))
        for name, extra in variants.items():
            targets[name], _ = start_gateway(s, upstream, name, REPO, extra)
        for port in targets.values():
            measure(wrk, lua, port, args.connections, 1)
        rounds = run_rounds(wrk, lua, targets, s.pids, args.connections, args.rounds, args.seconds)
        for (name, conns), samples in rounds.items():
            results.setdefault(name, {})[f"c{conns}"] = _median(samples)
        for name, port in targets.items():
            if name not in ("baseline", "off"):
                spans[name] = span_counts(port)

    c = f"c{args.connections}"
    off = results["off"]
    summary: dict[str, object] = {}
    for name, figs in results.items():
        if name == "off":
            continue
        summary[f"{name}_over_off_rps"] = figs[c].rps / off[c].rps
        summary[f"{name}_over_off_cpu_per_request"] = (figs[c].cpu_us_per_request or 0) / (off[c].cpu_us_per_request or 1)
        summary[f"{name}_added_p50_ms_c1"] = figs["c1"].p50_ms - off["c1"].p50_ms
    summary["on_100_cost_of_throughput"] = 1 - results["on-100"][c].rps / off[c].rps
    summary["meets_target"] = summary["on_100_cost_of_throughput"] <= TARGET_COST  # type: ignore[operator]

    print(f"\n{'target':11} {'req/s c=' + str(args.connections):>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 ms c=1':>11} {'cpu us/req':>11} {'vs off req/s':>13} {'vs off cpu':>11}")
    for name, figs in results.items():
        print(f"{name:11} {figs[c].rps:12.0f} {figs[c].p50_ms:8.3f} {figs[c].p99_ms:8.3f} {figs['c1'].p50_ms:11.3f} "
              f"{figs[c].cpu_us_per_request or 0:11.0f} {figs[c].rps / off[c].rps:13.3f} "
              f"{(figs[c].cpu_us_per_request or 0) / (off[c].cpu_us_per_request or 1):11.3f}")
    for name, counts in spans.items():
        print(f"{name}: {counts['exported']:.0f} spans exported, {counts['dropped']:.0f} dropped")
    print(f"100% sampling costs {summary['on_100_cost_of_throughput']:.1%} of the throughput (target <= "
          f"{TARGET_COST:.0%}: {'met' if summary['meets_target'] else 'MISSED'})")
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "loadtests/bench_tracing.py", *(argv if argv is not None else sys.argv[1:])]),
        "baseline_ref": ref, "load_generator": "wrk -t1", "seconds_per_measurement": args.seconds,
        "rounds": args.rounds, "connections": args.connections, "machine": machine,
        "busy_processes_at_start": busy, "load_average_1m_at_end": os.getloadavg()[0],
        "results": {name: {k: asdict(v) for k, v in figs.items()} for name, figs in results.items()},
        "spans": spans, "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
