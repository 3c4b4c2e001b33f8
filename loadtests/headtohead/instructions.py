"""Instructions per request, counted by callgrind: the repeatable figure for the hot path.

    .venv/bin/python loadtests/headtohead/instructions.py                      # gravity, bare, peers
    .venv/bin/python loadtests/headtohead/instructions.py --systems gravity    # just this checkout
    .venv/bin/python loadtests/headtohead/instructions.py --variant NAME=DIR   # A/B another checkout
    .venv/bin/python loadtests/headtohead/instructions.py --systems gravity \
        --variant "raw=.:server: {upstream_client: raw}"                       # A/B a config switch

Wall-clock figures on a shared 2-core machine move 2x with the neighbours; instruction counts do not.
Each system runs under `valgrind --tool=callgrind --instr-atstart=no` behind the same two static
nginx upstreams as the overhead part (routing on: the peers' cache_aware calls the render/tokenize
routes nginx answers). After a warm-up, counting is switched on with `callgrind_control -i on`, a
client sends exactly N requests on one keep-alive connection, counting is switched off and the
totals are dumped: instructions / N is what one request costs the system, all its threads and its
event loop's wake-ups included. Needs valgrind, nginx, and the peers' venvs (made on first use).
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MODEL, REPO, REQUEST, Stack, _machine, free_port, stack
from overhead import start_nginx, start_proc, wait_answers
from peers import SYSTEMS, ensure_venv, launch

RESULTS = REPO / "loadtests" / "results" / "instructions.json"
# Under callgrind a request takes ~50x longer, so the gateway's 0.1 s scrape loop would be counted
# as several scrapes per request (at production rates it is a tiny fraction of one) and its 0.5 s
# scrape timeout would mark the slowed upstreams down. The same for the 1 s health probes (two aiohttp
# requests a second): their share per request grew with the machine's load (a request under
# callgrind takes longer when the machine is busy), which moved the counts by 10 %; at 60 s neither
# runs within a measurement. Scrape rarely and wait long for them; the
# peers' own background health checks run at their default (seconds) intervals anyway.
GRAVITY_UNDER_CALLGRIND = ("routing: {scrape_interval_s: 60, scrape_timeout_s: 30, stale_after_s: 600}\n"
                           "resilience: {health: {probe_timeout_s: 30, probe_interval_s: 60}}\n")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _gravity_launch(s: Stack, port: int, workers: list[str], extra: str = "") -> tuple[list[str], dict[str, str]]:
    """Gravity's harness config with the callgrind settings and a variant's YAML merged in (a second
    `server:` block appended as text would replace the first one whole)."""
    spec = launch(SYSTEMS["gravity"], s.tmp, port, workers, MODEL)
    for path in spec.files:
        cfg = yaml.safe_load(Path(path).read_text())
        for more in (GRAVITY_UNDER_CALLGRIND, extra):
            cfg = _merge(cfg, yaml.safe_load(more) or {})
        Path(path).write_text(yaml.safe_dump(cfg))
    return spec.argv, spec.env


_TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def _callgrind(argv: list[str], out: Path) -> list[str]:
    # %p: a server that serves from a worker process (granian) writes the worker's counts apart.
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
            f"--callgrind-out-file={out}.%p", *argv]


def _serving_pid(pid: int) -> int:
    """The process that serves: `pid` itself, or its one worker child when it forks one."""
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:
        children = []
    return children[0] if len(children) == 1 else pid


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True, timeout=120)


def send_requests(port: int, n: int, body: bytes = REQUEST, headers: dict[str, str] | None = None) -> None:
    """`n` chat completions one after another on one keep-alive connection; any non-200 stops the run."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"content-type": "application/json", **(headers or {})}
    try:
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise SystemExit(f"port {port}: {resp.status} {answer[:200]!r}")
    finally:
        conn.close()


def _totals(out: Path) -> int:
    """Instructions in the dump(s) callgrind wrote for this process since counting was switched on."""
    total = 0
    for part in out.parent.glob(out.name + ".*"):
        # A dump has `summary:` (events in the header's scope, 0 here) and `totals:`: take the larger.
        total += max((int(x) for x in _TOTALS.findall(part.read_bytes())), default=0)
    return total


def count(s: Stack, name: str, argv: list[str], env: dict[str, str], port: int, n: int, warmup: int,
          cwd: Path = REPO, body: bytes = REQUEST) -> dict[str, float]:
    out = s.tmp / f"callgrind.{name}.out"
    start_proc(s, name, _callgrind(argv, out), port, env, cwd=cwd, timeout=600)  # slow start under valgrind
    wait_answers(port, body, timeout=600)
    pid = _serving_pid(s.pids[name])
    out = out.with_name(f"{out.name}.{pid}")
    send_requests(port, warmup, body)
    _control("--zero", pid)  # nothing was counted yet (instrumentation is off), but be sure
    _control("--instr=on", pid)
    t0 = time.monotonic()
    send_requests(port, n, body)
    seconds = time.monotonic() - t0
    _control("--instr=off", pid)
    _control("--dump", pid)
    deadline = time.monotonic() + 60
    while not (total := _totals(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not total:
        raise SystemExit(f"{name}: callgrind wrote no totals to {out}")
    return {"instructions_per_request": total / n, "requests": n, "seconds_under_callgrind": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="bare,gravity,vllm-router-rr,vllm-router-ca,smg-ca",
                    help=f"comma list of bare, bare-granian (needs granian installed), {', '.join(SYSTEMS)}")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:YAML]",
                    help="also count the gateway run from checkout DIR, with YAML merged into its config "
                         "(e.g. 'server: {upstream_client: raw}'): A/B of a change in one run")
    ap.add_argument("--stream", type=int, default=0, metavar="CHUNKS",
                    help="streamed requests instead: the SSE upstream answers CHUNKS chunks 1 ms apart; also "
                         "prints instructions per relayed chunk")
    ap.add_argument("--interval-ms", type=float, default=1.0,
                    help="with --stream: the gap between chunks; one long enough that the slowed gateway reads "
                         "each chunk on its own (10) makes the per-chunk count independent of timing")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    names = [x for x in args.systems.split(",") if x]
    results: dict[str, dict[str, float]] = {}
    commands: dict[str, list[str]] = {}
    started = dt.datetime.now(dt.UTC)
    with stack() as s:
        port_a, port_b = start_nginx(s, nginx)
        body = REQUEST
        if args.stream:
            port_a, port_b = free_port(), free_port()
            s.start("direct-sse", [sys.executable, str(Path(__file__).with_name("sse_upstream.py")), "--port",
                                   str(port_a), "--port", str(port_b), "--chunks", str(args.stream),
                                   "--interval-ms", str(args.interval_ms)], port_a)
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Stream, please."}],
                               "max_tokens": args.stream, "stream": True}).encode()
        workers = [f"http://127.0.0.1:{p}" for p in (port_a, port_b)]
        jobs: list[tuple[str, list[str], dict[str, str], int, Path]] = []
        for name in names:
            port = free_port()
            if name in ("bare", "bare-granian"):
                argv_ = [sys.executable, str(REPO / "loadtests" / "bare_proxy.py"), "--port", str(port),
                         "--upstream", workers[0], "--server", "granian" if name == "bare-granian" else "uvicorn"]
                jobs.append((name, argv_, dict(os.environ), port, REPO))
                continue
            system = SYSTEMS[name]
            if system.peer is None:
                jobs.append((name, *_gravity_launch(s, port, workers), port, REPO))
                continue
            ensure_venv(system.peer)
            spec = launch(system, s.tmp, port, workers, MODEL)
            jobs.append((name, spec.argv, spec.env, port, REPO))
        for spec_ in args.variant:
            vname, _, rest = spec_.partition("=")
            source, _, extra = rest.partition(":")
            port = free_port()
            jobs.append((vname, *_gravity_launch(s, port, workers, extra), port, Path(source).resolve()))
        for name, argv_, env, port, cwd in jobs:  # one at a time: nothing else under valgrind meanwhile
            print(f"[instructions] {name} under callgrind ...", flush=True)
            results[name] = count(s, name, argv_, env, port, args.requests, args.warmup, cwd, body)
            if args.stream:
                results[name]["instructions_per_chunk"] = results[name]["instructions_per_request"] / args.stream
            commands[name] = argv_
            per_chunk = (f", {results[name]['instructions_per_chunk'] / 1e3:8.1f} k instr/chunk"
                         if args.stream else "")
            print(f"[instructions] {name:16} {results[name]['instructions_per_request'] / 1e6:8.3f} M instr/request"
                  f"{per_chunk}", flush=True)
            s.procs[-1].terminate()
            s.procs[-1].wait(60)
    base = results.get("gravity")
    print(f"\n{'system':18} {'M instructions/request':>24} {'vs gravity':>11}")
    for name, r in results.items():
        ratio = f"{r['instructions_per_request'] / base['instructions_per_request']:.2f}x" if base else "-"
        print(f"{name:18} {r['instructions_per_request'] / 1e6:24.3f} {ratio:>11}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "machine": _machine(),
        "command": " ".join([sys.executable, *sys.argv]), "results": results, "commands": commands,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
