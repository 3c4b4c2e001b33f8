"""The shared harness of the loadtests/ benchmarks: a static nginx upstream, wrk (or an aiohttp
fallback), process bookkeeping, CPU-per-request accounting and interleaved measurement rounds.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-model"

REQUEST = json.dumps({"model": MODEL, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}).encode()
# A realistic non-streaming answer (~600 bytes), served verbatim by nginx.
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "Hello there, nice to meet you!",
                             "tool_calls": [], "reasoning_content": None}}],
    "usage": {"prompt_tokens": 27, "completion_tokens": 9, "total_tokens": 36,
              "prompt_tokens_details": {"cached_tokens": 16}},
    "system_fingerprint": None, "prompt_logprobs": None,
}, separators=(",", ":"))
MODELS = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "vllm", "root": MODEL,
     "max_model_len": 8192}]}, separators=(",", ":"))
# The gauges the scraper reads, idle, so the endpoint is healthy and routable.
METRICS = "".join(f'{name}{{engine="0",model_name="{MODEL}"}} {value}\n' for name, value in (
    ("vllm:num_requests_running", 0.0), ("vllm:num_requests_waiting", 0.0),
    ("vllm:kv_cache_usage_perc", 0.0), ("vllm:prefix_cache_queries_total", 0.0),
    ("vllm:prefix_cache_hits_total", 0.0)))

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        default_type application/json;
        location = /v1/chat/completions {{ return 200 '{completion}'; }}
        location = /v1/models {{ return 200 '{models}'; }}
        location = /metrics {{ default_type "text/plain; version=0.0.4"; return 200 '{metrics}'; }}
        location = /health {{ return 200 '{{}}'; }}
    }}
}}
"""

# wrk reports the latency distribution itself; the done() hook prints it as one JSON line.
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %f, "connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, ' ..
    '"timeouts": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""

INSTALL_HINT = ("bench_overhead needs {what}. On Debian/Ubuntu: "
                "sudo apt-get update && sudo apt-get install -y nginx-light wrk")


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_request: float | None = None
    """CPU the server process (and its children) spent per request: robust to noisy neighbours."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port} within {timeout}s")


def post_once(port: int, timeout: float = 5.0) -> tuple[int, bytes]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=REQUEST,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return int(resp.status), bytes(resp.read())


def wait_routable(port: int, timeout: float = 20.0) -> None:
    """The gateway answers 503 until its first scrape marks the backend healthy."""
    import urllib.error

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = post_once(port)
            if status == 200 and json.loads(body)["choices"]:
                return
            last = status
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise SystemExit(f"port {port} never answered a chat completion with 200 (last: {last})")


class Stack:
    """The processes of one run; stopped in reverse order whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}

    def start(self, name: str, args: list[str], port: int, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "TIKTOKEN_CACHE_DIR": str(REPO / "config" / "tiktoken")})
        log.close()
        self.procs.append(proc)
        self.pids[name] = proc.pid
        try:
            wait_port(port, proc)
        except SystemExit:
            print((self.tmp / f"{name}.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="gravity-bench-") as tmp:
        s = Stack(Path(tmp))
        try:
            yield s
        finally:
            s.stop()


def start_nginx(s: Stack, nginx: str) -> int:
    port = free_port()
    conf = s.tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=s.tmp, port=port, completion=COMPLETION, models=MODELS,
                                      metrics=METRICS))
    s.start("direct", [nginx, "-c", str(conf), "-p", str(s.tmp), "-e", str(s.tmp / "nginx-error.log")], port)
    return port



def run_wrk(wrk: str, lua: Path, port: int, connections: int, seconds: float) -> Sample:
    args = [wrk, "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s",
            "-s", str(lua), f"http://127.0.0.1:{port}/v1/chat/completions"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return Sample(rps=r["requests"] / (r["duration_us"] / 1e6), p50_ms=r["p50_us"] / 1000,
                  p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000, requests=r["requests"],
                  errors=errors)


async def _aiohttp_load(port: int, connections: int, seconds: float) -> Sample:
    """Fallback generator when wrk is missing; it spends more CPU than wrk, so figures are lower."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(url, data=REQUEST, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    qs = statistics.quantiles(latencies, n=100, method="inclusive")
    return Sample(rps=len(latencies) / elapsed, p50_ms=qs[49] * 1000, p90_ms=qs[89] * 1000,
                  p99_ms=qs[98] * 1000, requests=len(latencies), errors=errors)


def measure(wrk: str | None, lua: Path, port: int, connections: int, seconds: float) -> Sample:
    if wrk:
        return run_wrk(wrk, lua, port, connections, seconds)
    return asyncio.run(_aiohttp_load(port, connections, seconds))


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its direct children (nginx's worker, the embedded redis)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure_cpu(wrk: str | None, lua: Path, port: int, pid: int, connections: int, seconds: float) -> Sample:
    before = cpu_seconds(pid)
    sample = measure(wrk, lua, port, connections, seconds)
    if sample.requests:
        sample.cpu_us_per_request = (cpu_seconds(pid) - before) / sample.requests * 1e6
    return sample


def _median(samples: list[Sample]) -> Sample:
    """Per-figure median over rounds: one noisy neighbour burst should not decide the result."""
    def med(attr: str) -> float:
        return float(statistics.median(getattr(x, attr) for x in samples))
    cpu = [x.cpu_us_per_request for x in samples if x.cpu_us_per_request is not None]
    return Sample(rps=med("rps"), p50_ms=med("p50_ms"), p90_ms=med("p90_ms"), p99_ms=med("p99_ms"),
                  requests=sum(x.requests for x in samples), errors=sum(x.errors for x in samples),
                  cpu_us_per_request=float(statistics.median(cpu)) if cpu else None)


def _machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "load_average_1m_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "platform": platform.platform()}


def _busy_processes() -> list[str]:
    """Other processes using CPU when the run starts, to record what shared the cores."""
    out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True,
                         text=True, check=False).stdout
    busy = []
    for line in out.splitlines()[:10]:
        pcpu, _, comm = line.strip().partition(" ")
        with contextlib.suppress(ValueError):
            if float(pcpu) >= 5.0:
                busy.append(f"{comm.strip()} {pcpu}%")
    return busy


def run_rounds(wrk: str | None, lua: Path, targets: dict[str, int], pids: dict[str, int], connections: int,
               rounds: int, seconds: float) -> dict[tuple[str, int], list[Sample]]:
    """Measure every target at `connections` and at 1 connection, interleaving targets in each round
    so a neighbour's burst hits them alike; prints one line per measurement."""
    out: dict[tuple[str, int], list[Sample]] = {}
    width = max(len(name) for name in targets)
    for r in range(rounds):
        for name, port in targets.items():
            for conns in (connections, 1):
                sample = measure_cpu(wrk, lua, port, pids[name], conns, seconds)
                out.setdefault((name, conns), []).append(sample)
                print(f"round {r + 1}/{rounds} {name:{width}} c={conns:<3} {sample.rps:9.0f} req/s  "
                      f"p50 {sample.p50_ms:6.3f} ms  p99 {sample.p99_ms:6.3f} ms  "
                      f"cpu {sample.cpu_us_per_request or 0:5.0f} us/req  errors {sample.errors}", flush=True)
    return out
