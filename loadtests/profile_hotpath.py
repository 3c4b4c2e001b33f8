"""Where a non-streamed request's CPU goes inside the gateway, by layer (py-spy samples).

    .venv/bin/python loadtests/profile_hotpath.py                 # this checkout, 20 s, 4 connections
    .venv/bin/python loadtests/profile_hotpath.py --yaml 'server: {engine: fast}'

Starts the two static nginx upstreams of the head-to-head harness and Gravity in front of them
(default profile, auth and tracing off), drives it with N keep-alive client threads and records
`py-spy record -f raw` on the gateway. Each sample is charged to the innermost frame that belongs to
a known layer (server, Starlette, Gravity's pipeline/admission/routing/dispatcher/metrics/logs, the
upstream client), so a layer's share is its *self* share including the library code it calls into
(json, asyncio's own bookkeeping is a layer of its own). Needs py-spy (`pip install py-spy`) and nginx.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "headtohead"))
from harness import MODEL, REQUEST, stack
from instructions import _merge
from overhead import start_nginx, start_proc, wait_answers
from peers import SYSTEMS, free_port, launch

# (layer, substring of "function (file)") in the order they are tried from the innermost frame out.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("metrics", ("gateway/metrics.py", "prometheus_client")),
    ("access log", ("gateway/logs.py", "logging/")),
    ("tracing hooks", ("gateway/telemetry",)),
    ("routing/scheduler", ("routing/",)),
    ("admission/policies", ("gateway/admission.py", "policies/")),
    ("sessions/state", ("gateway/state/",)),
    ("dispatcher", ("gateway/dispatcher.py", "gateway/resume.py", "gateway/sse.py")),
    ("transport (gravity side)", ("gateway/transport.py",)),
    ("client: gravity rawclient", ("gateway/rawclient.py",)),
    ("server: gravity httpserver", ("gateway/httpserver.py",)),
    ("pipeline/exchange", ("gateway/pipeline.py", "gateway/exchange.py")),
    ("parse/body", ("gateway/openai_requests.py",)),
    ("proxy/edge", ("gateway/proxy.py", "gateway/app.py", "gateway/upstream.py", "gateway/errors.py")),
    ("connection guard", ("gateway/conn_guard.py",)),
    ("client: aiohttp", ("aiohttp/", "multidict", "yarl/")),
    ("server: uvicorn/httptools", ("uvicorn/", "httptools")),
    ("server: starlette", ("starlette/",)),
    ("asyncio/uvloop", ("asyncio/", "uvloop")),
]


# Innermost frames that are a socket write (the syscall's time shows on the Python line that makes it).
WRITES = ("StreamWriter._writelines (aiohttp/http_writer.py", "httptools_impl.py:524)", "httptools_impl.py:551)",
          "HttpProtocol.write (gateway/httpserver.py", "_exchange (gateway/rawclient.py:344)")


def _layer(stack_line: str) -> str:
    frames = stack_line.split(";")
    if any(w in frames[-1] for w in WRITES):
        return "socket writes (syscalls)"
    if frames[-1].startswith("Runner.run (asyncio/runners.py"):
        return "event loop C code (epoll, reads, callbacks)"
    for frame in reversed(frames):  # innermost first
        for layer, marks in LAYERS:
            if any(m in frame for m in marks):
                return layer
    return "other (interpreter, idle)"


def _drive(port: int, stop: threading.Event, counter: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        conn.request("POST", "/v1/chat/completions", body=REQUEST, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        counter[0] += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--yaml", default="", help="appended to the gateway's config")
    ap.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    ap.add_argument("--report", type=Path, help="only print the shares of an earlier --raw file")
    args = ap.parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with stack() as s:
        port_a, port_b = start_nginx(s, nginx)
        port = free_port()
        spec = launch(SYSTEMS["gravity"], s.tmp, port, [f"http://127.0.0.1:{p}" for p in (port_a, port_b)], MODEL)
        if args.yaml:  # merged, not appended: a second `server:` block would replace the first whole
            for path in spec.files:
                cfg = _merge(yaml.safe_load(Path(path).read_text()), yaml.safe_load(args.yaml) or {})
                Path(path).write_text(yaml.safe_dump(cfg))
        start_proc(s, "gravity", spec.argv, port, spec.env)
        wait_answers(port, REQUEST.encode() if isinstance(REQUEST, str) else REQUEST)
        raw = args.raw or s.tmp / "pyspy.txt"
        stop, counter = threading.Event(), [0]
        threads = [threading.Thread(target=_drive, args=(port, stop, counter), daemon=True)
                   for _ in range(args.connections)]
        for t in threads:
            t.start()
        time.sleep(1)
        counter[0] = 0
        spy = subprocess.run([py_spy, "record", "-r", str(args.rate), "-d", str(int(args.seconds)), "-f", "raw",
                              "-p", str(s.pids["gravity"]), "-o", str(raw), "--nonblocking"],
                             check=False, capture_output=True, text=True)
        done = counter[0]
        stop.set()
        for t in threads:
            t.join(10)
        if spy.returncode != 0:
            print(spy.stderr, file=sys.stderr)
            return 1
        print(f"{done} requests in ~{args.seconds:.0f} s")
        report(raw)
    return 0


def report(raw: Path) -> None:
    shares: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack_line, _, n = line.rpartition(" ")
        shares[_layer(stack_line)] += int(n)
    total = sum(shares.values())
    print(f"{total} samples")
    for layer, n in shares.most_common():
        print(f"  {layer:44} {100 * n / total:5.1f} %")


if __name__ == "__main__":
    raise SystemExit(main())
