"""Routing part: N `gravity sim` replicas (h100-8b, time-scaled, small KV), the same traces replayed
open-loop against each system, caches reset between systems; figures from the client (TTFT, ITL,
e2e, errors) and from the simulators' own counters (cluster hit rate, requests per replica, keep-up).
"""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, Stack, free_port
from overhead import start_proc, start_system, wait_answers
from peers import Launch
from traces import MODEL, trace

sys.path.insert(0, str(REPO))
import itertools

from routing.eval.metrics import percentile
from routing.eval.trace import TraceRecord, write_trace

_COUNTER = re.compile(r'^(vllm:[a-z0-9_]+?)(?:_total)?(?:\{[^}]*\})? ([0-9.e+-]+)$', re.MULTILINE)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def _post(port: int, path: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def _runner(port: int) -> dict[str, float]:
    """/admin/runner, or zeros from a simulator older than it (--sim-source, to measure the old lag)."""
    try:
        return dict(json.loads(_get(port, "/admin/runner")))
    except OSError:
        return {"wall_busy_s": 0.0, "engine_busy_s": 0.0, "slipped_s": 0.0}


def working_set_blocks(records: list[TraceRecord], block_size: int = 16) -> int:
    """Distinct full KV blocks the trace's prompts need (as the simulator tokenizes and hashes them):
    the cache the whole trace would need to hit every shared prefix."""
    from simulator.kvcache import block_hashes
    from simulator.openai_api import chat_prompt_text
    from simulator.tokenizer import encode

    seen: set[int] = set()
    for rec in records:
        ids = encode(chat_prompt_text({"model": MODEL, "messages": list(rec.messages or ())}))
        seen.update(block_hashes(ids, block_size))
    return len(seen)


def _calls(port: int) -> dict[str, int]:
    """Requests per route a simulator served (/admin/calls), or none from an older simulator."""
    try:
        return {k: int(v) for k, v in json.loads(_get(port, "/admin/calls")).items()}
    except OSError:
        return {}


_DECISION = re.compile(r'^([a-z_:]*(?:decision|load_balanc|cache_hit|cache_miss)[a-z_]*)(\{[^}]*\})? ([0-9.e+-]+)$',
                       re.MULTILINE)


def peer_decisions(port: int | None) -> dict[str, float]:
    """The peer's own counters of its routing decisions (cache hit / miss / load balance), by label."""
    if port is None:
        return {}
    try:
        text = _get(port, "/metrics")
    except OSError:
        return {}
    return {name + labels: float(value) for name, labels, value in _DECISION.findall(text)}


def sim_counters(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in _COUNTER.findall(_get(port, "/metrics")):
        out[name] = out.get(name, 0.0) + float(value)
    return out


async def _one(session: aiohttp.ClientSession, base: str, rec: TraceRecord, scale: float) -> dict[str, Any]:
    body = {"model": MODEL, "messages": list(rec.messages or ()), "max_tokens": rec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    started = time.perf_counter()
    stamps: list[float] = []
    try:
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return {"error": f"http {resp.status}"}
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                if isinstance(event.get("error"), dict):
                    return {"error": "stream error"}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": type(exc).__name__}
    if not stamps:
        return {"error": "no tokens"}
    # The replicas run `scale` x faster than real time: report engine (model) seconds.
    return {"ttft": (stamps[0] - started) * scale, "e2e": (stamps[-1] - started) * scale,
            "itl": [(b - a) * scale for a, b in itertools.pairwise(stamps)], "tokens": len(stamps)}


async def replay(base: str, records: list[TraceRecord], scale: float, cap_s: float) -> tuple[list[dict[str, Any]], float]:
    timeout = aiohttp.ClientTimeout(total=cap_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        tasks = []
        for rec in records:
            delay = rec.t / scale - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, base, rec, scale)))
        results = await asyncio.gather(*tasks)
        return list(results), (time.perf_counter() - t0) * scale


def _summary(results: list[dict[str, Any]], engine_s: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    ttft, e2e = [r["ttft"] for r in ok], [r["e2e"] for r in ok]
    itl = [g for r in ok for g in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)

    def p(xs: list[float], q: float) -> float:
        return percentile(xs, q) if xs else float("nan")
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {"ttft_p50": p(ttft, 50), "ttft_p90": p(ttft, 90), "ttft_p99": p(ttft, 99),
            "itl_p50": p(itl, 50), "itl_p99": p(itl, 99), "e2e_p50": p(e2e, 50), "e2e_p90": p(e2e, 90),
            "tokens_per_s": tokens / engine_s if engine_s else 0.0, "errors": sum(errors.values()),
            "error_kinds": errors, "ttft_all": sorted(ttft)}


def run(s: Stack, systems: list[str], *, backends: int, time_scale: float, kv_blocks: int, workloads: list[str],
        requests: int, max_tokens: int, seed: int, sim_source: Path = REPO, log: Any = print) -> dict[str, Any]:
    import os
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(REPO / "config" / "tiktoken")}
    sims = []
    sim_args = ["--profile", "h100-8b", "--kv-blocks", str(kv_blocks), "--time-scale", str(time_scale),
                "--model", MODEL]
    for i in range(backends):
        port = free_port()
        start_proc(s, f"sim-{i}", [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port),
                                   *sim_args], port, {**env, "PYTHONPATH": str(sim_source)}, cwd=sim_source)
        sims.append(port)
    workers = [f"http://127.0.0.1:{p}" for p in sims]
    commands: dict[str, list[str]] = {}
    launched: dict[str, Launch] = {}
    out: dict[str, Any] = {"settings": {"backends": backends, "time_scale": time_scale, "kv_blocks": kv_blocks,
                                        "kv_tokens_per_replica": kv_blocks * 16, "requests": requests,
                                        "max_tokens": max_tokens, "seed": seed, "simulator_args": sim_args,
                                        "simulator_source": str(sim_source)},
                           "workloads": {}, "commands": commands}
    traces_dir = s.tmp / "traces"
    traces_dir.mkdir()
    for w, name in enumerate(workloads):
        records = trace(name, requests, seed, backends, max_tokens)
        write_trace(traces_dir / f"{name}.jsonl", records)
        blocks = working_set_blocks(records)
        out["workloads"][name] = {"requests": len(records), "rate": len(records) / max(records[-1].t, 1e-9),
                                  "working_set_blocks": blocks, "working_set_per_replica_cache": blocks / kv_blocks,
                                  "trace": str(traces_dir / f"{name}.jsonl"), "systems": {}}
        log(f"{name}: {len(records)} requests, working set {blocks:,} blocks = {blocks / kv_blocks:.1f}x one "
            f"replica's KV ({kv_blocks:,} blocks)")
        order = systems[w % len(systems):] + systems[: w % len(systems)]  # rotate: no system always first
        for system in order:
            port = start_system(s, system, workers, MODEL, f"-{name}", commands, launched)
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ready?"}],
                               "max_tokens": 1}).encode()
            wait_answers(port, body)
            for sp in sims:  # empty caches, queues and counters (the engine is replaced)
                _post(sp, "/admin/reset")
            time.sleep(1.0)  # scrapers and health checks see the reset replicas
            runner0 = [_runner(sp) for sp in sims]
            calls0 = [_calls(sp) for sp in sims]
            decisions0 = peer_decisions(launched[f"{system}-{name}"].metrics_port)
            cap = max(records[-1].t / time_scale * 3, 60.0)
            results, engine_s = asyncio.run(replay(f"http://127.0.0.1:{port}", records, time_scale, cap))
            counters = [sim_counters(sp) for sp in sims]
            runner1 = [_runner(sp) for sp in sims]
            calls1 = [_calls(sp) for sp in sims]
            decisions1 = peer_decisions(launched[f"{system}-{name}"].metrics_port)
            s.procs[-1].terminate()
            s.procs[-1].wait(15)
            row = _summary(results, engine_s)
            hits = sum(c.get("vllm:prefix_cache_hits", 0.0) for c in counters)
            queries = sum(c.get("vllm:prefix_cache_queries", 0.0) for c in counters)
            row["hit_rate"] = hits / queries if queries else 0.0
            row["per_replica"] = [int(c.get("vllm:e2e_request_latency_seconds_count", 0)) for c in counters]
            keep = []
            for a, b in zip(runner0, runner1, strict=True):
                wall = b["wall_busy_s"] - a["wall_busy_s"]
                keep.append((b["engine_busy_s"] - a["engine_busy_s"]) / (wall * time_scale) if wall > 0 else 1.0)
            row["keep_up"] = keep
            row["keep_up_min"] = min(keep)
            row["slipped_s"] = sum(b["slipped_s"] - a["slipped_s"] for a, b in zip(runner0, runner1, strict=True))
            row["engine_s"] = engine_s
            # What the system asked the replicas per client request besides generating: vllm-router
            # renders (or, without the render endpoints, tokenizes) on the workers to route.
            paths = sorted({k for c in calls1 for k in c})
            delta = {k: sum(b.get(k, 0) - a.get(k, 0) for a, b in zip(calls0, calls1, strict=True)) for k in paths}
            row["calls"] = {k: v for k, v in delta.items() if v}
            row["calls_per_request"] = {k: v / len(records) for k, v in row["calls"].items()
                                        if k not in ("/metrics", "/health", "/v1/models", "/admin/runner",
                                                     "/admin/calls", "/admin/reset")}
            row["decisions"] = {k: v - decisions0.get(k, 0.0) for k, v in decisions1.items()
                                if v - decisions0.get(k, 0.0)}
            # Mean TTFT the client saw minus the mean the engines recorded from arrival: what the
            # system adds before a request reaches an engine (routing, render fan-out) and on relay.
            n_ttft = sum(c.get("vllm:time_to_first_token_seconds_count", 0.0) for c in counters)
            engine_ttft = sum(c.get("vllm:time_to_first_token_seconds_sum", 0.0) for c in counters) / n_ttft if n_ttft else float("nan")
            ok_ttft = [r["ttft"] for r in results if "error" not in r]
            row["engine_ttft_mean"] = engine_ttft
            row["client_ttft_mean"] = sum(ok_ttft) / len(ok_ttft) if ok_ttft else float("nan")
            row["added_ttft_mean"] = row["client_ttft_mean"] - engine_ttft
            served = row["per_replica"]
            row["spread"] = max(served) / (sum(served) / len(served)) if sum(served) else float("nan")
            out["workloads"][name]["systems"][system] = row
            log(f"{name:14} {system:15} TTFT p50 {row['ttft_p50']:.3f} p90 {row['ttft_p90']:.3f} s  hit "
                f"{row['hit_rate']:.3f}  per replica {row['per_replica']}  errors {row['errors']}  "
                f"keep-up {row['keep_up_min']:.2f}  calls/request {row['calls_per_request']}")
        # keep the table order stable whatever the rotation
        out["workloads"][name]["systems"] = {k: out["workloads"][name]["systems"][k] for k in systems}
    return out
