"""Admission overhead: the same gateway with policies off and with two limit configurations, against
one static nginx upstream and a loopback redis-server, all in one run:

- `limits_off`: no policies (the baseline);
- `one_scope`: API key auth, one per-key TPM + RPM limit (the common case);
- `worst`: API key auth, key + tenant + (tenant, model) scopes, each with TPM, RPM, TPD and concurrency.

    .venv/bin/python loadtests/bench_limits.py            # ~1.5 minutes; needs nginx, wrk, redis-server

Prints req/s and p50/p99 at 32 connections, p50 at 1 connection and gateway CPU per request for
each, then each limited configuration's ratio and added latency against `limits_off`, and writes
them to loadtests/results/limits.json. Budgets are set far above the load so every request takes
the full reserve + settle path and none is refused.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    INSTALL_HINT,
    MODEL,
    REQUEST,
    WRK_LUA,
    Stack,
    _machine,
    _median,
    free_port,
    measure_cpu,
    run_rounds,
    stack,
    start_nginx,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results" / "limits.json"
TARGET_ADDED_P50_MS = 0.3
KEY = "gk-bench-key"
LIMITS = "{tpm: 1000000000, rpm: 100000000, tpd: 100000000000, concurrency: 100000}"
ONE_SCOPE = "{tpm: 1000000000, rpm: 100000000}"
CONFIGS = ("limits_off", "one_scope", "worst")


def _policies_yaml(config: str) -> str:
    if config == "limits_off":
        return ""
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    limits = ONE_SCOPE if config == "one_scope" else LIMITS
    out = ("policies:\n"
           "  auth:\n"
           "    enabled: true\n"
           "    redis_keys: false\n"
           f"    keys: [{{name: bench, sha256: {sha}, tenant: bench, limits: {limits}}}]\n")
    if config == "worst":
        out += ("  tenants:\n"
                f"    bench: {{limits: {LIMITS}, models: {{{MODEL}: {LIMITS}}}}}\n")
    return out


def _post(port: int) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=REQUEST,
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status), {k.lower(): v for k, v in resp.headers.items()}, bytes(resp.read())


def start_gateway(s: Stack, upstream: int, redis_port: int, name: str) -> int:
    port = free_port()
    cfg = s.tmp / f"{name}.yaml"
    cfg.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"state: {{redis_url: \"redis://127.0.0.1:{redis_port}/0\"}}\n"
        f"backends:\n  - {{name: nginx-0, url: \"http://127.0.0.1:{upstream}\", kind: vllm, models: [{MODEL}]}}\n"
        + _policies_yaml(name))
    s.start(name, [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], port)
    deadline = time.monotonic() + 20
    while True:
        try:
            status, headers, _ = _post(port)
            if status == 200:
                if name != "limits_off" and "x-ratelimit-remaining-tokens" not in headers:
                    raise SystemExit("the limited gateway answered without x-ratelimit headers")
                return port
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never answered 200")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    wrk = shutil.which("wrk")
    redis = shutil.which("redis-server")
    if not (nginx and wrk and redis):
        print(INSTALL_HINT.format(what="nginx and wrk") + " (and redis-server)", file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.UTC)
    machine = _machine()
    with stack() as s:

        upstream = start_nginx(s, nginx)
        redis_port = free_port()
        s.start("redis", [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(s.tmp)], redis_port)
        targets = {name: start_gateway(s, upstream, redis_port, name) for name in CONFIGS}
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()).replace(
            'wrk.headers["Content-Type"] = "application/json"',
            f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {KEY}"'))
        for name, port in targets.items():
            measure_cpu(wrk, lua, port, s.pids[name], args.connections, 1)  # warm up
        rounds = run_rounds(wrk, lua, targets, s.pids, args.connections, args.rounds, args.seconds)
    med = {k: _median(v) for k, v in rounds.items()}
    c = args.connections
    off, off1 = med[("limits_off", c)], med[("limits_off", 1)]
    summary: dict[str, object] = {"target_added_p50_ms": TARGET_ADDED_P50_MS}
    for name in CONFIGS[1:]:
        on, on1 = med[(name, c)], med[(name, 1)]
        summary[name] = {
            "throughput_ratio_vs_off": on.rps / off.rps,
            "p50_ratio_vs_off": on.p50_ms / off.p50_ms,
            "p99_ratio_vs_off": on.p99_ms / off.p99_ms,
            "added_p50_ms_c1": on1.p50_ms - off1.p50_ms,
            f"added_p50_ms_c{c}": on.p50_ms - off.p50_ms,
            "added_cpu_us_per_request": (on.cpu_us_per_request or 0) - (off.cpu_us_per_request or 0),
            "meets_target": on1.p50_ms - off1.p50_ms <= TARGET_ADDED_P50_MS,
        }
    print()
    print(f"{'':12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p50 c=1':>8} {'cpu us/req':>10}")
    for name in CONFIGS:
        a, b = med[(name, c)], med[(name, 1)]
        print(f"{name:12} {a.rps:9.0f} {a.p50_ms:8.3f} {a.p99_ms:8.3f} {b.p50_ms:8.3f} "
              f"{(a.cpu_us_per_request or 0):10.0f}")
    for name in CONFIGS[1:]:
        f = summary[name]
        assert isinstance(f, dict)
        print(f"{name:10} vs limits_off: throughput {f['throughput_ratio_vs_off']:.3f}x  "
              f"p50 {f['p50_ratio_vs_off']:.3f}x  p99 {f['p99_ratio_vs_off']:.3f}x  "
              f"added p50 c=1 {f['added_p50_ms_c1']:+.3f} ms (target <= {TARGET_ADDED_P50_MS} ms: "
              f"{'met' if f['meets_target'] else 'MISSED'})  added cpu {f['added_cpu_us_per_request']:+.0f} us/req")
    out = {"started": started.isoformat(timespec="seconds"),
           "command": " ".join(["python", "loadtests/bench_limits.py",
                                *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine, "load_average_1m_at_end": os.getloadavg()[0], "seconds": args.seconds,
           "rounds": args.rounds, "connections": c, "summary": summary,
           "medians": {f"{n}@c={k}": asdict(v) for (n, k), v in med.items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
