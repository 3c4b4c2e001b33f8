"""What each fault costs clients: real simulators with their fault switches, the gateway, redis-server,
and the openai SDK with `max_retries=0`, so every recovery is the gateway's own. One process tree:

    nice -n 10 .venv/bin/python loadtests/bench_faults.py          # ~4 minutes

Each scenario starts a fresh fleet (redis-server with appendonly/appendfsync always, three
simulators, one gateway), runs a closed loop of streamed chat completions (`ignore_eos`, fixed
length), injects its fault on replica sim-1 (or Redis) a few seconds in, and reports client errors,
short streams, resumed streams and TTFT/e2e p50/p99 with their ratio to the no-fault baseline
measured in the same run. Scenarios run in rounds, the order reversed every other round (so the
baseline runs first and last); the table shows each figure's median over the rounds (errors: the
sum), and the JSON keeps every round. Writes loadtests/results/faults.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.procs import Proc, start_gateway, start_redis, start_sim

RESULTS = REPO / "loadtests" / "results" / "faults.json"
MODEL = "sim-llama"
PERSIST = ["--appendonly", "yes", "--appendfsync", "always"]
STALL_S = 2.0
"""The gateway's stall timeout in this benchmark (the default, 60 s, suits long reasoning pauses)."""


@dataclass
class Scenario:
    name: str
    fault: str
    """none | kill | error500 | error429 | stall | redis"""
    resume: bool = True


SCENARIOS = [
    Scenario("baseline", "none"),
    Scenario("kill", "kill"),
    Scenario("kill, no resume", "kill", resume=False),
    Scenario("500 burst", "error500"),
    Scenario("429 burst", "error429"),
    Scenario("stall", "stall"),
    Scenario("stall, no resume", "stall", resume=False),
    Scenario("redis kill", "redis"),
]


@dataclass
class Sample:
    started: float
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    resumed: bool = False
    error: str | None = None


@dataclass
class Result:
    scenario: str
    requests: int
    client_errors: int
    short: int
    resumed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


async def _post(url: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.post(url, data=json.dumps(body)) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")


async def _one(client: openai.AsyncOpenAI, seed: int, max_tokens: int) -> Sample:
    sample = Sample(time.monotonic())
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell story number {seed} about gateways."}],
            stream=True, max_tokens=max_tokens, seed=seed, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, extra_headers={"x-session-id": f"user-{seed % 16}"})
        async for chunk in stream:
            if sample.ttft is None and chunk.choices:
                sample.ttft = time.monotonic() - sample.started
            extra = chunk.model_extra or {}
            if chunk.choices and extra.get("x_gravity"):
                sample.resumed = True
            if chunk.usage is not None:
                sample.tokens = chunk.usage.completion_tokens
        sample.e2e = time.monotonic() - sample.started
    except openai.APIStatusError as exc:
        sample.error = f"{exc.status_code}"
    except openai.APIError as exc:  # an SSE error event, a broken connection, a timeout
        sample.error = type(exc).__name__
    return sample


async def _load(gw: Proc, seconds: float, concurrency: int, max_tokens: int, fault_at: float,
                fault: Callable[[], Awaitable[None]] | None) -> list[Sample]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0,
                                timeout=120)
    samples: list[Sample] = []
    until = time.monotonic() + seconds

    async def worker(n: int) -> None:
        i = n
        while time.monotonic() < until:
            samples.append(await _one(client, i, max_tokens))
            i += concurrency

    async def inject() -> None:
        await asyncio.sleep(fault_at)
        if fault is not None:
            await fault()

    await asyncio.gather(inject(), *(worker(n) for n in range(concurrency)))
    await client.close()
    return samples


def _fleet(tmp: Path, scenario: Scenario) -> tuple[Proc, list[Proc], Proc]:
    redis = start_redis(tmp, extra=PERSIST)
    sims = [start_sim(tmp, MODEL) for _ in range(3)]
    cfg = {"backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                        for i, s in enumerate(sims)],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           # Limits far above the load, so every request takes the Redis reserve + settle path.
           "policies": {"tenants": {"default": {"limits": {"rpm": 10_000_000, "tpm": 1_000_000_000}}}},
           "resilience": {"timeouts": {"stall_s": STALL_S}, "resume": {"enabled": scenario.resume}}}
    return start_gateway(tmp, cfg), sims, redis


async def _run(tmp: Path, scenario: Scenario, seconds: float, concurrency: int, max_tokens: int,
               fault_at: float) -> list[Sample]:
    gw, sims, redis = _fleet(tmp, scenario)
    procs = [gw, *sims, redis]
    victim = sims[1]
    faults_url = f"http://127.0.0.1:{victim.port}/admin/faults"

    async def fault() -> None:
        if scenario.fault == "kill":
            victim.kill()
        elif scenario.fault in ("error500", "error429"):
            await _post(faults_url, {"fail_next": 50, "fail_status": int(scenario.fault[-3:])})
        elif scenario.fault == "stall":
            await _post(faults_url, {"stall_after": 8})
        elif scenario.fault == "redis":
            redis.kill()
            await asyncio.sleep(3.0)
            procs.append(start_redis(tmp, port=redis.port, extra=PERSIST))

    try:
        await asyncio.sleep(1.0)  # a scrape or two
        return await _load(gw, seconds, concurrency, max_tokens, fault_at,
                           None if scenario.fault == "none" else fault)
    finally:
        for p in procs:
            p.stop()


def _summarise(name: str, samples: list[Sample], max_tokens: int) -> Result:
    ok = [s for s in samples if s.error is None]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    ttft = [s.ttft * 1000 for s in ok if s.ttft is not None]
    e2e = [s.e2e * 1000 for s in ok if s.e2e is not None]
    return Result(name, len(samples), len(samples) - len(ok), sum(1 for s in ok if s.tokens != max_tokens),
                  sum(1 for s in ok if s.resumed), _pct(ttft, 50), _pct(ttft, 99), _pct(e2e, 50), _pct(e2e, 99),
                  errors)


def _median(runs: list[Result]) -> Result:
    def med(key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return Result(runs[0].scenario, sum(r.requests for r in runs), sum(r.client_errors for r in runs),
                  sum(r.short for r in runs), sum(r.resumed for r in runs), med("ttft_p50_ms"), med("ttft_p99_ms"),
                  med("e2e_p50_ms"), med("e2e_p99_ms"), errors)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=14.0, help="load per scenario")
    p.add_argument("--fault-at", type=float, default=4.0, help="seconds into the load")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="every scenario this many times, interleaved")
    p.add_argument("--only", action="append", help="run only these scenarios (by name; repeatable)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    rounds: dict[str, list[Result]] = {s.name: [] for s in chosen}
    with tempfile.TemporaryDirectory(prefix="gravity-faults-") as tmp:
        for n in range(args.rounds):
            for scenario in chosen if n % 2 == 0 else reversed(chosen):
                started = time.monotonic()
                samples = asyncio.run(_run(Path(tmp), scenario, args.seconds, args.concurrency, args.max_tokens,
                                           args.fault_at))
                rounds[scenario.name].append(_summarise(scenario.name, samples, args.max_tokens))
                print(f"  round {n + 1} {scenario.name}: {len(samples)} requests in "
                      f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = [_median(runs) for runs in rounds.values()]
    base = [r for r in results if r.scenario.startswith("baseline")]
    if base:
        ref = base[0]
        for r in results:
            r.ratios = {k: round(getattr(r, k) / getattr(ref, k), 2) if getattr(ref, k) else float("nan")
                        for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")}
    print(f"medians over {args.rounds} rounds; requests, errors, short, resumed: totals")
    head = (f"{'scenario':<18} {'requests':>8} {'errors':>6} {'short':>5} {'resumed':>7} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'e2e p50':>9} {'e2e p99':>9} {'e2e p99 x':>9}")
    print(head)
    for r in results:
        print(f"{r.scenario:<18} {r.requests:>8} {r.client_errors:>6} {r.short:>5} {r.resumed:>7} "
              f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.e2e_p50_ms:>7.0f}ms {r.e2e_p99_ms:>7.0f}ms "
              f"{r.ratios.get('e2e_p99_ms', float('nan')):>9.2f}" + (f"  {r.errors}" if r.errors else ""))
    out = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "args": vars(args),
           "stall_timeout_s": STALL_S, "results": [asdict(r) for r in results],
           "rounds": {name: [asdict(r) for r in runs] for name, runs in rounds.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
