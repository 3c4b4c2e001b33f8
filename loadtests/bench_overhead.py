"""Gateway overhead: the same load straight to a static nginx upstream, through a bare
Starlette+aiohttp proxy, and through the gateway (routing on), all in one run.

    .venv/bin/python loadtests/bench_overhead.py            # ~1 minute; needs nginx and wrk
    apt-get install -y nginx-light wrk                      # Debian packages it uses

Prints req/s and p50/p99 at 32 connections and p50 at 1 connection for each target, the ratios,
the added latency, and writes them to loadtests/results/overhead.json. Everything binds to
127.0.0.1 and every phase is bounded in time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    COMPLETION,
    INSTALL_HINT,
    MODEL,
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
    post_once,
    run_rounds,
    stack,
    start_nginx,
    wait_routable,
)

RESULTS = REPO / "loadtests" / "results" / "overhead.json"
TARGET_RPS = 5000.0
TARGET_ADDED_P50_MS = 0.3


def start_gateway(s: Stack, upstream: int, name: str = "gateway", source: Path = REPO,
                  extra_yaml: str = "") -> tuple[int, subprocess.Popen[bytes]]:
    """`python -m gateway serve` run from `source` (a checkout) with one backend and default routing."""
    port = free_port()
    cfg = s.tmp / f"{name}.yaml"
    cfg.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"state: {{embedded_dir: {json.dumps(str(s.tmp / ('redis-' + name)))}}}\n"
        f"backends:\n  - {{name: nginx-0, url: \"http://127.0.0.1:{upstream}\", kind: vllm, models: [{MODEL}]}}\n"
        + extra_yaml)
    proc = s.start(name, [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], port, cwd=source)
    wait_routable(port)
    return port, proc


def start_bare(s: Stack, upstream: int) -> int:
    port = free_port()
    s.start("bare", [sys.executable, str(REPO / "loadtests" / "bare_proxy.py"), "--port", str(port),
                     "--upstream", f"http://127.0.0.1:{upstream}"], port)
    wait_routable(port)
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets; medians are reported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare Starlette+aiohttp baseline")
    parser.add_argument("--loadgen", choices=("wrk", "aiohttp"), default="wrk")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:YAML]",
                        help="also measure the gateway run from checkout DIR, optionally with YAML appended "
                             "to its config (e.g. a routing section); for A/B of a change in one run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 120:
        parser.error("--rounds must be 1..20 and --seconds 1..120")

    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if not nginx:
        print(INSTALL_HINT.format(what="nginx as the static upstream"), file=sys.stderr)
        return 2
    wrk = shutil.which("wrk") if args.loadgen == "wrk" else None
    if args.loadgen == "wrk" and not wrk:
        print(INSTALL_HINT.format(what="wrk as the load generator") +
              "\nFalling back to the built-in aiohttp generator (uses more CPU, so figures are lower).",
              file=sys.stderr)

    started = dt.datetime.now(dt.UTC)
    machine = _machine()
    busy = _busy_processes()
    results: dict[str, dict[str, Sample]] = {}
    with stack() as s:
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()))
        upstream = start_nginx(s, nginx)
        targets = {"direct": upstream}
        if not args.no_bare:
            targets["bare"] = start_bare(s, upstream)
        targets["gateway"], _ = start_gateway(s, upstream)
        for spec in args.variant:
            name, _, rest = spec.partition("=")
            source, _, extra = rest.partition(":")
            extra_yaml = Path(extra).read_text() if extra else ""
            targets[name], _ = start_gateway(s, upstream, name, Path(source or REPO).resolve(), extra_yaml)
        status, body = post_once(targets["gateway"])
        if status != 200 or json.loads(body) != json.loads(COMPLETION):
            raise SystemExit(f"the gateway changed the upstream answer: {status} {body[:200]!r}")

        for port in targets.values():  # warm connection pools and code paths
            measure(wrk, lua, port, args.connections, 1)
        rounds = run_rounds(wrk, lua, targets, s.pids, args.connections, args.rounds, args.seconds)
        for (name, conns), samples in rounds.items():
            results.setdefault(name, {})[f"c{conns}"] = _median(samples)

    c = f"c{args.connections}"
    direct, gateway = results["direct"], results["gateway"]
    added_p50_ms = gateway["c1"].p50_ms - direct["c1"].p50_ms
    summary: dict[str, object] = {
        "gateway_over_direct_rps": gateway[c].rps / direct[c].rps,
        "added_p50_ms_c1": added_p50_ms,
        "added_p50_ms_c32": gateway[c].p50_ms - direct[c].p50_ms,
        "meets_rps_target": gateway[c].rps >= TARGET_RPS,
        "meets_latency_target": added_p50_ms <= TARGET_ADDED_P50_MS,
    }
    for name in results.keys() - {"direct", "bare", "gateway"}:
        summary[f"{name}_over_gateway_rps"] = results[name][c].rps / gateway[c].rps
        summary[f"{name}_added_p50_ms_c1"] = results[name]["c1"].p50_ms - direct["c1"].p50_ms
    if "bare" in results:
        summary["gateway_over_bare_rps"] = gateway[c].rps / results["bare"][c].rps
        summary["bare_added_p50_ms_c1"] = results["bare"]["c1"].p50_ms - direct["c1"].p50_ms

    print(f"\n{'target':12} {'req/s c=' + str(args.connections):>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 ms c=1':>11} {'cpu us/req':>11}")
    for name, figs in results.items():
        print(f"{name:12} {figs[c].rps:12.0f} {figs[c].p50_ms:8.3f} {figs[c].p99_ms:8.3f} {figs['c1'].p50_ms:11.3f} "
              f"{figs[c].cpu_us_per_request or 0:11.0f}")
    print(f"\ngateway/direct req/s: {summary['gateway_over_direct_rps']:.3f}"
          + (f"   gateway/bare req/s: {summary['gateway_over_bare_rps']:.3f}" if "bare" in results else ""))
    print(f"added p50 at c=1: {added_p50_ms:.3f} ms (target <= {TARGET_ADDED_P50_MS} ms: "
          f"{'met' if summary['meets_latency_target'] else 'MISSED'});  gateway req/s at c={args.connections}: "
          f"{gateway[c].rps:.0f} (target >= {TARGET_RPS:.0f}: {'met' if summary['meets_rps_target'] else 'MISSED'})")

    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "loadtests/bench_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_generator": "wrk -t1" if wrk else "aiohttp (built-in)",
        "seconds_per_measurement": args.seconds, "rounds": args.rounds, "connections": args.connections,
        "machine": machine, "busy_processes_at_start": busy,
        "load_average_1m_at_end": os.getloadavg()[0],
        "results": {name: {k: asdict(v) for k, v in figs.items()} for name, figs in results.items()},
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
