"""Overhead part: the same static upstreams behind every system, routing on, in interleaved rounds.

Non-streamed: wrk against nginx (two ports = two backends per router), req/s at C connections, p50/p99
at C and at 1, CPU per request from /proc. Streamed: the SSE upstream (N chunks at a fixed interval)
behind every system, C concurrent streams: CPU per relayed chunk and the inter-chunk gaps the client
sees, against the upstream measured directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    COMPLETION,
    METRICS,
    MODEL,
    MODELS,
    REPO,
    REQUEST,
    WRK_LUA,
    Stack,
    _median,
    cpu_seconds,
    free_port,
    measure,
    run_rounds,
    wait_port,
)
from peers import SYSTEMS, Launch, launch
from stream_client import StreamSample, build_request, run_streams
from upstreams import nginx_conf


def wait_answers(port: int, body: bytes, timeout: float = 120.0) -> None:
    """Until a chat completion through `port` is a 200 (the peers discover workers asynchronously)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.25)
    raise SystemExit(f"port {port} never answered a chat completion (last: {last})")


def start_proc(s: Stack, name: str, argv: list[str], port: int, env: dict[str, str], cwd: Path = REPO,
               timeout: float = 600) -> None:
    """Stack.start with an environment of the caller's (the peers need their own variables)."""
    import subprocess

    with open(s.tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    s.procs.append(proc)
    s.pids[name] = proc.pid
    try:
        wait_port(port, proc, timeout=timeout)
    except SystemExit:
        print((s.tmp / f"{name}.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise


def start_nginx(s: Stack, nginx: str) -> tuple[int, int]:
    """nginx as the static upstream on two free ports (the completion, /v1/models and /metrics
    answers every router's workers serve); returns the two ports."""
    port_a, port_b = free_port(), free_port()
    conf = s.tmp / "nginx.conf"
    conf.write_text(nginx_conf(s.tmp, port_a, port_b, COMPLETION, MODELS, METRICS))
    s.start("direct", [nginx, "-c", str(conf), "-p", str(s.tmp), "-e", str(s.tmp / "nginx-error.log")], port_a)
    return port_a, port_b


def start_system(s: Stack, name: str, workers: list[str], model: str, tag: str,
                 commands: dict[str, list[str]], launched: dict[str, Launch] | None = None) -> int:
    port = free_port()
    spec = launch(SYSTEMS[name], s.tmp, port, workers, model)
    start_proc(s, f"{name}{tag}", spec.argv, port, spec.env, cwd=spec.cwd or REPO)
    commands[f"{name}{tag}"] = spec.argv
    if launched is not None:
        launched[f"{name}{tag}"] = spec
    return port


def run(s: Stack, systems: list[str], *, wrk: str | None, nginx: str, rounds: int, seconds: float,
        connections: int, stream_connections: int, chunks: int, interval_ms: float, bare: bool = True,
        hold_streams: int = 1000, hold_chunks: int = 40, hold_interval_ms: float = 500.0,
        log: Any = print) -> dict[str, Any]:
    port_a, port_b = start_nginx(s, nginx)
    sse_a, sse_b = free_port(), free_port()
    s.start("direct-sse", [sys.executable, str(Path(__file__).with_name("sse_upstream.py")), "--port", str(sse_a),
                           "--port", str(sse_b), "--chunks", str(chunks), "--interval-ms", str(interval_ms)], sse_a)
    commands: dict[str, list[str]] = {}
    plain = {"direct": port_a}
    streamed = {"direct-sse": sse_a}
    if bare:
        # The floor for any Python proxy on this stack (one upstream, no routing), for same-run ratios.
        port = free_port()
        argv = [sys.executable, str(REPO / "loadtests" / "bare_proxy.py"), "--port", str(port), "--upstream",
                f"http://127.0.0.1:{port_a}"]
        start_proc(s, "bare", argv, port, dict(os.environ))
        plain["bare"], commands["bare"] = port, argv
    for name in systems:
        plain[name] = start_system(s, name, [f"http://127.0.0.1:{p}" for p in (port_a, port_b)], MODEL, "", commands)
        streamed[name + "-sse"] = start_system(s, name, [f"http://127.0.0.1:{p}" for p in (sse_a, sse_b)],
                                               MODEL, "-sse", commands)
    stream_body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": chunks, "stream": True}).encode()
    for name, port in plain.items():
        wait_answers(port, REQUEST)
    for name, port in streamed.items():
        wait_answers(port, stream_body)
    log("all systems answer; warming up")

    lua = s.tmp / "post.lua"
    lua.write_text(WRK_LUA.format(body=REQUEST.decode()))
    for port in plain.values():
        measure(wrk, lua, port, connections, 1)
    samples = run_rounds(wrk, lua, plain, s.pids, connections, rounds, seconds)
    nonstream: dict[str, dict[str, Any]] = {}
    for (name, conns), got in samples.items():
        nonstream.setdefault(name, {})[f"c{conns}"] = asdict(_median(got))
        nonstream[name].setdefault("rounds", {})[f"c{conns}"] = [asdict(x) for x in got]

    request = build_request(MODEL, chunks)
    stream_rounds: dict[str, list[StreamSample]] = {}
    for port in streamed.values():
        asyncio.run(run_streams(port, stream_connections, 1.0, request, chunks))
    for r in range(rounds):
        for name, port in streamed.items():
            before = cpu_seconds(s.pids[name])
            sample = asyncio.run(run_streams(port, stream_connections, seconds, request, chunks))
            if sample.chunks:
                sample.cpu_us_per_chunk = (cpu_seconds(s.pids[name]) - before) / sample.chunks * 1e6
            stream_rounds.setdefault(name, []).append(sample)
            sm = sample.summary()
            log(f"round {r + 1}/{rounds} {name:20} streams {sm['streams_per_s']:7.1f}/s chunks {sm['chunks_per_s']:8.0f}/s "
                f"gap p50 {sm['gap_p50_ms']:6.2f} p99 {sm['gap_p99_ms']:7.2f} ms  cpu {sm['cpu_us_per_chunk'] or 0:6.1f} "
                f"us/chunk  errors {sample.errors}")
    stream: dict[str, dict[str, Any]] = {}
    for name, got in stream_rounds.items():
        sums = [x.summary() for x in got]
        med = {k: _med([float(x[k]) for x in sums if x[k] is not None]) for k in sums[0]}
        stream[name.removesuffix("-sse")] = {"median": med, "rounds": sums}
    held = _hold_phase(s, systems, hold_streams, hold_chunks, hold_interval_ms, commands, log) if hold_streams else {}
    return {"nonstream": nonstream, "stream": stream, "hold": held,
            "upstream": {"nginx_ports": [port_a, port_b], "sse_chunks": chunks, "sse_interval_ms": interval_ms,
                         "hold_streams": hold_streams, "hold_chunks": hold_chunks,
                         "hold_interval_ms": hold_interval_ms},
            "commands": commands}


def _hold_phase(s: Stack, systems: list[str], streams: int, chunks: int, interval_ms: float,
                commands: dict[str, list[str]], log: Any) -> dict[str, Any]:
    """`streams` streams open at once through each system (own upstream pair: long, slow streams),
    one system at a time, the upstream alone first; figures in hold.HoldSample.summary."""
    from hold import hold

    a, b = free_port(), free_port()
    argv = [sys.executable, str(Path(__file__).with_name("sse_upstream.py")), "--port", str(a), "--port", str(b),
            "--chunks", str(chunks), "--interval-ms", str(interval_ms)]
    s.start("direct-hold", argv, a)
    commands["direct-hold"] = argv
    ports = {"direct": a}
    for name in systems:
        ports[name] = start_system(s, name, [f"http://127.0.0.1:{p}" for p in (a, b)], MODEL, "-hold", commands)
    stream_body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": chunks, "stream": True}).encode()
    for port in ports.values():
        wait_answers(port, stream_body)
    request = build_request(MODEL, chunks)
    ramp = 2.0
    stream_s = chunks * interval_ms / 1000
    out: dict[str, Any] = {}
    for name, port in ports.items():
        pid = s.pids["direct-hold" if name == "direct" else f"{name}-hold"]
        before = cpu_seconds(pid)
        sample = asyncio.run(hold(port, streams, request, chunks, deadline_s=ramp + stream_s * 3 + 30, ramp_s=ramp))
        if sample.chunks:
            sample.cpu_us_per_chunk = (cpu_seconds(pid) - before) / sample.chunks * 1e6
        # Every stream is open from the end of the ramp until the first one can end.
        sm = sample.summary(interval_ms, full_from_s=ramp + interval_ms / 1000, full_until_s=stream_s)
        out[name] = sm
        log(f"hold {name:16} {sm['completed']}/{streams} streams (peak open {sm['peak_open']}) added p50 "
            f"{sm['added_p50_ms']:6.2f} p99 {sm['added_p99_ms']:7.2f} ms, growth of p99 first->last window "
            f"{sm['growth_p99_ms']:+6.2f} ms, cpu {sm['cpu_us_per_chunk'] or 0:6.1f} us/chunk, errors {sm['errors']}")
    return out


def _med(values: list[float]) -> float:
    import statistics
    return float(statistics.median(values)) if values else float("nan")
