"""Gravity with auth + a per-key rate limit (one Redis round trip, real redis-server: the gateway's
embedded one) against the same config without, one run, interleaved rounds, nginx upstream.

    .venv/bin/python loadtests/headtohead/auth_ab.py --rounds 3 --seconds 5

Both get the same Authorization header (ignored with auth off). Figures: req/s at 32 connections,
p50 at 1 connection; the difference is what auth + rate limits add.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    COMPLETION,
    METRICS,
    MODEL,
    MODELS,
    REQUEST,
    WRK_LUA,
    free_port,
    measure,
    run_rounds,
    stack,
)
from overhead import start_proc
from upstreams import nginx_conf

KEY = "sk-bench-auth-ab"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--output", default="")
    args = ap.parse_args()
    wrk, nginx = shutil.which("wrk"), shutil.which("nginx") or "/usr/sbin/nginx"
    with stack() as s:
        a, b = free_port(), free_port()
        conf = s.tmp / "nginx.conf"
        conf.write_text(nginx_conf(s.tmp, a, b, COMPLETION, MODELS, METRICS))
        s.start("direct", [nginx, "-c", str(conf), "-p", str(s.tmp), "-e", str(s.tmp / "nginx-error.log")], a)
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
