"""Gravity with auth + a per-key rate limit (one Redis round trip, real redis-server: the gateway's
embedded one) against the same config without, one run, interleaved rounds, nginx upstream.

    .venv/bin/python loadtests/headtohead/auth_ab.py --rounds 3 --seconds 5
    .venv/bin/python loadtests/headtohead/auth_ab.py --instructions   # callgrind, + redis-server's share

Both get the same Authorization header (ignored with auth off). Figures: req/s at 32 connections,
p50 at 1 connection; the difference is what auth + rate limits add.

`--instructions` counts each config under callgrind (as headtohead/instructions.py does) against a
redis-server of the run's own on a free port (not under valgrind; shared in-flight counts off, as
with the embedded Redis of the wall-clock runs), and reads that server's INFO commandstats over the
counted requests: what one request costs the gateway, and what it costs Redis. Under callgrind a
request takes ~50x longer, so the 5 ms settlement batch holds about one request (~8 at full speed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    MODEL,
    REQUEST,
    WRK_LUA,
    Stack,
    free_port,
    measure,
    run_rounds,
    stack,
)
from instructions import GRAVITY_UNDER_CALLGRIND, _callgrind, _control, _serving_pid, _totals, send_requests
from overhead import start_nginx, start_proc

KEY = "sk-bench-auth-ab"
AUTH = {"authorization": f"Bearer {KEY}"}
POLICIES = f"""policies:
  auth:
    enabled: true
    redis_keys: false
    keys:
      - {{name: bench, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, tenant: bench,
         limits: {{rpm: 100000000, tpm: 100000000000}}}}
  rate_limits: {{enabled: true}}
"""


def _wait_answers(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=REQUEST,
                                     headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.25)


def _redis(port: int, *command: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True, check=True)
    return out.stdout


def _commandstats(port: int) -> dict[str, dict[str, float]]:
    """INFO commandstats: calls and µs per command since the last CONFIG RESETSTAT."""
    stats: dict[str, dict[str, float]] = {}
    for line in _redis(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            stats[name.removeprefix("cmdstat_")] = {"calls": float(fields["calls"]), "usec": float(fields["usec"])}
    return stats


def _config(s: Stack, port: int, a: int, b: int, state: str, extra: str) -> Path:
    backends = "".join(f'  - {{name: w{i}, url: "http://127.0.0.1:{p}", kind: vllm, models: [{MODEL}]}}\n'
                       for i, p in enumerate((a, b)))
    path = s.tmp / f"gravity-{port}.yaml"
    path.write_text(f"server: {{host: 127.0.0.1, port: {port}, read_timeout_s: 600}}\n"
                    f"state: {state}\nbackends:\n{backends}{extra}")
    return path


def instructions(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    out: dict[str, dict[str, float]] = {}
    with stack() as s:
        a, b = start_nginx(s, nginx)
        rport = free_port()
        s.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], rport)
        for name, extra in (("plain", ""), ("auth+rl", POLICIES)):
            port = free_port()
            path = _config(s, port, a, b, f"{{redis_url: 'redis://127.0.0.1:{rport}/0', shared_inflight: {{enabled: false}}}}",
                           GRAVITY_UNDER_CALLGRIND + extra)
            dump = s.tmp / f"callgrind.{name}.out"
            start_proc(s, name, _callgrind([sys.executable, "-m", "gateway", "serve", "--config", str(path)], dump),
                       port, dict(os.environ))
            _wait_answers(port, timeout=600)
            pid = _serving_pid(s.pids[name])
            dump = dump.with_name(f"{dump.name}.{pid}")
            send_requests(port, args.warmup, headers=AUTH)
            _control("--zero", pid)
            _redis(rport, "CONFIG", "RESETSTAT")
            _control("--instr=on", pid)
            send_requests(port, args.requests, headers=AUTH)
            _control("--instr=off", pid)
            _control("--dump", pid)
            stats = _commandstats(rport)
            deadline = time.monotonic() + 60
            while not (total := _totals(dump)) and time.monotonic() < deadline:
                time.sleep(0.5)
            if not total:
                raise SystemExit(f"{name}: callgrind wrote no totals to {dump}")
            n = args.requests
            out[name] = {"instructions_per_request": total / n,
                         "redis_calls_per_request": sum(v["calls"] for v in stats.values()) / n,
                         "redis_usec_per_request": sum(v["usec"] for v in stats.values()) / n,
                         **{f"redis_{k}_usec_per_call": v["usec"] / v["calls"] for k, v in stats.items()
                            if v["calls"]},
                         **{f"redis_{k}_calls_per_request": v["calls"] / n for k, v in stats.items()}}
            print(f"[instructions] {name:8} {total / n / 1e6:7.3f} M instr/request, redis "
                  f"{out[name]['redis_calls_per_request']:.2f} calls {out[name]['redis_usec_per_request']:.1f} us"
                  f" per request {json.dumps({k: round(v, 3) for k, v in out[name].items() if k.startswith('redis_')})}",
                  flush=True)
            s.procs[-1].terminate()
            s.procs[-1].wait(60)
    plain, auth = out["plain"]["instructions_per_request"], out["auth+rl"]["instructions_per_request"]
    print(f"auth+rl - plain: {(auth - plain) / 1e3:.1f} k instructions per request ({auth / plain:.3f}x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--output", default="")
    ap.add_argument("--instructions", action="store_true", help="callgrind counts instead of wrk")
    ap.add_argument("--requests", type=int, default=300, help="--instructions: requests counted")
    ap.add_argument("--warmup", type=int, default=100, help="--instructions: requests before counting")
    args = ap.parse_args()
    if args.instructions:
        got = instructions(args)
        if args.output:
            Path(args.output).write_text(json.dumps(got, indent=1))
        return
    wrk, nginx = shutil.which("wrk"), shutil.which("nginx") or "/usr/sbin/nginx"
    with stack() as s:
        a, b = start_nginx(s, nginx)
        ports: dict[str, int] = {}
        for name, extra in (("plain", ""), ("auth+rl", POLICIES)):
            port = free_port()
            backends = "".join(f'  - {{name: w{i}, url: "http://127.0.0.1:{p}", kind: vllm, models: [{MODEL}]}}\n'
                               for i, p in enumerate((a, b)))
            path = s.tmp / f"gravity-{port}.yaml"
            path.write_text(f"server: {{host: 127.0.0.1, port: {port}, read_timeout_s: 600}}\n"
                            f"state: {{embedded_dir: {json.dumps(str(s.tmp / f'redis-{port}'))}}}\n"
                            f"backends:\n{backends}{extra}")
            start_proc(s, name, [sys.executable, "-m", "gateway", "serve", "--config", str(path)], port,
                       dict(os.environ))
            ports[name] = port
        for port in ports.values():
            _wait_answers(port)
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()).replace(
            'wrk.headers["Content-Type"] = "application/json"',
            f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {KEY}"'))
        for port in ports.values():
            warm = measure(wrk, lua, port, 32, 1)
            assert warm.requests and not warm.errors, warm
        samples = run_rounds(wrk, lua, ports, s.pids, 32, args.rounds, args.seconds)
    out = {}
    for (name, conns), got in samples.items():
        out.setdefault(name, {})[f"c{conns}"] = {
            "req_s": statistics.median(x.rps for x in got), "p50_ms": statistics.median(x.p50_ms for x in got),
            "cpu_us_per_request": statistics.median(x.cpu_us_per_request or 0 for x in got),
            "errors": sum(x.errors for x in got), "rounds": [x.p50_ms if conns == 1 else x.rps for x in got]}
    print(json.dumps(out, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
