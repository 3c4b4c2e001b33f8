"""How far past its limit each limit kind lets traffic go across gateway replicas, measured.

Two real gateway processes (and, as the baseline of the same run, one) share one real redis-server in
front of two simulators; for every limit kind (RPM, TPM, concurrency) on every scope (key, tenant, (tenant, model)) clients
hammer all replicas at once: impatient and polite retries of refused requests, half of them sharing
one `x-request-id`, streamed and plain answers, requests without `max_tokens` that generate more
than their reservation, and backends failing some attempts (the gateway retries them elsewhere).
Then Redis is killed and the fail-open local limiters are measured the same way. Each row prints
the limit, what was admitted, the overshoot past the limit and the bound docs/policies.md derives;
`loadtests/results/overshoot.json` gets the figures.

    nice -n 10 .venv/bin/python loadtests/bench_overshoot.py [--replicas 1,2] [--seconds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from policies.keys import hash_key
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
RPM, TPM, CONC = 30, 3000, 3
LIMITS = {"rpm": RPM, "tpm": TPM, "concurrency": CONC}
DEFAULT_MAX_TOKENS = 8
"""Reserved for a request without max_tokens; the simulator's natural end is anywhere in 1..64."""
LOCAL_SHARE = 0.5
CLIENTS = 12
REPEATED_ID = "one-id-for-everybody"


@dataclass
class Cell:
    scope: str   # key | tenant | model
    kind: str    # rpm | tpm | concurrency
    redis: bool = True

    @property
    def name(self) -> str:
        return f"{'' if self.redis else 'failopen-'}{self.scope}-{self.kind}"

    @property
    def limit(self) -> int:
        return LIMITS[self.kind]


@dataclass
class Row:
    cell: str
    scope: str
    kind: str
    redis: bool
    limit: int
    window_s: float
    admitted: int
    """Requests admitted (any answer but 429)."""
    measured: float
    """What the limit counts: admitted requests (rpm), tokens used (tpm), most running at once at the
    backends (concurrency)."""
    overshoot: float
    """measured - limit."""
    excess: int
    """Sum over admitted requests of max(0, used - reserved): usage beyond the estimate."""
    bound: float
    """The documented worst case for `measured`."""
    refused: int
    retries: int
    repeated_id: int
    """Admitted requests that carried the shared x-request-id."""
    errors: dict[str, int] = field(default_factory=dict)


WARM_KEY = "key-warm-up"


def _keys_and_tenants(cells: list[Cell]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # A budget far above the load, so the warm-up teaches the estimator and spends no cell's budget.
    keys: list[dict[str, Any]] = [{"name": "warm-up", "sha256": hash_key(WARM_KEY), "tenant": "warm-up",
                                   "limits": {"tpm": 10_000_000}}]
    tenants: dict[str, Any] = {}
    for c in cells:
        lim = {c.kind: c.limit}
        if c.scope == "key":
            keys.append({"name": c.name, "sha256": hash_key(f"key-{c.name}"), "tenant": f"t-{c.name}",
                         "limits": lim})
            continue
        # Two keys of one tenant: the tenant's (or the tenant-model's) budget is shared by both.
        for suffix in ("a", "b"):
            keys.append({"name": f"{c.name}-{suffix}", "sha256": hash_key(f"key-{c.name}-{suffix}"),
                         "tenant": f"t-{c.name}"})
        tenants[f"t-{c.name}"] = {"limits": lim} if c.scope == "tenant" else {"models": {MODEL: lim}}
    return keys, tenants


def _config(cells: list[Cell], redis: Proc, sims: list[Proc]) -> dict[str, Any]:
    keys, tenants = _keys_and_tenants(cells)
    return {
        "server": {"debug_headers": True},
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": f"sim{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                     for i, s in enumerate(sims)],
        "policies": {
            "auth": {"enabled": True, "redis_keys": False, "keys": keys},
            "tenants": tenants,
            "rate_limits": {"failure_mode": "open", "local_share": LOCAL_SHARE, "redis_timeout_s": 0.25,
                            "redis_retry_s": 1.0, "default_max_tokens": DEFAULT_MAX_TOKENS},
        },
    }


@dataclass
class Done:
    sent: float
    ended: float
    used: int | None
    reserved: int
    repeated: bool


class Run:
    def __init__(self, cell: Cell, gateways: list[str], seconds: float) -> None:
        self.cell, self.gateways, self.seconds = cell, gateways, seconds
        self.done: list[Done] = []
        self.refused = 0
        self.retries = 0
        self.errors: dict[str, int] = {}
        self.start = 0.0

    def key_for(self, client: int) -> str:
        c = self.cell
        return f"key-{c.name}" if c.scope == "key" else f"key-{c.name}-{'ab'[client % 2]}"

    def body(self, client: int, n: int) -> tuple[bytes, bool]:
        msgs = [{"role": "user", "content": f"client {client} asks question {n}: what is data gravity?"}]
        if self.cell.kind == "concurrency":  # long enough to overlap
            return orjson.dumps({"model": MODEL, "messages": msgs, "max_tokens": 48, "ignore_eos": True}), False
        shape = n % 3
        if shape == 0:
            return orjson.dumps({"model": MODEL, "messages": msgs, "max_tokens": 24, "stream": True,
                                 "stream_options": {"include_usage": True}}), True
        if shape == 1:
            return orjson.dumps({"model": MODEL, "messages": msgs, "max_tokens": 24}), False
        # No max_tokens: DEFAULT_MAX_TOKENS is reserved, the natural end may be 64 tokens away.
        return orjson.dumps({"model": MODEL, "messages": msgs}), False

    async def one(self, s: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes,
                  stream: bool) -> tuple[int, dict[str, str], int | None]:
        async with s.post(url, data=body, headers=headers) as r:
            raw = await r.read()
            hdrs = {k.lower(): v for k, v in r.headers.items()}
            used = None
            if r.status == 200:
                if stream:
                    for line in raw.split(b"\n"):
                        if line.startswith(b"data: {") and b'"usage"' in line:
                            usage = orjson.loads(line[6:]).get("usage")
                            if usage:
                                used = usage["total_tokens"]
                else:
                    used = orjson.loads(raw)["usage"]["total_tokens"]
            return r.status, hdrs, used

    async def client(self, s: aiohttp.ClientSession, i: int) -> None:
        repeated = i % 2 == 0
        impatient = i % 3 != 0
        end = self.start + self.seconds
        n = 0
        while time.monotonic() < end:
            body, stream = self.body(i, n)
            headers = {"authorization": f"Bearer {self.key_for(i)}", "content-type": "application/json"}
            if repeated:
                headers["x-request-id"] = REPEATED_ID
            for attempt in range(4):  # a refused request is retried (the same body and id)
                if time.monotonic() >= end:
                    break
                url = self.gateways[(i + n + attempt) % len(self.gateways)] + "/v1/chat/completions"
                sent = time.monotonic()
                try:
                    status, hdrs, used = await self.one(s, url, headers, body, stream)
                except aiohttp.ClientError as exc:
                    self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                    break
                if status == 429:
                    self.refused += 1
                    self.retries += attempt < 3
                    wait = 0.02 if impatient else int(hdrs.get("retry-after-ms", "1000")) / 1000
                    await asyncio.sleep(max(0.0, min(wait, end - time.monotonic())))
                    continue
                if status != 200:
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1
                self.done.append(Done(sent - self.start, time.monotonic() - self.start, used,
                                      int(hdrs.get("x-gravity-reserved-tokens", "0")), repeated))
                break
            n += 1

    async def go(self, sims: list[str]) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
            stop = asyncio.Event()

            async def faults() -> None:
                # Now and then a backend fails its next attempt: the gateway retries it on the other.
                k = 0
                while not stop.is_set():
                    await asyncio.sleep(0.7)
                    async with s.post(sims[k % len(sims)] + "/admin/faults",
                                      json={"fail_next": 1, "fail_status": 503}) as r:
                        await r.read()
                    k += 1

            self.start = time.monotonic()
            injector = asyncio.create_task(faults())
            await asyncio.gather(*(self.client(s, i) for i in range(CLIENTS)))
            stop.set()
            injector.cancel()
            for url in sims:
                async with s.post(url + "/admin/faults", json={"fail_next": 0}) as r:
                    await r.read()


async def _backend_peak(sims: list[str], since_wall: float) -> int:
    """Most requests running at once across the backends (their own request records)."""
    edges: list[tuple[float, int]] = []
    async with aiohttp.ClientSession() as s:
        for url in sims:
            async with s.get(url + "/admin/requests") as r:
                records = (await r.json())["requests"]
            for rec in records:
                t = rec["timings"]
                if t["received_at"] >= since_wall and t["e2e_s"] is not None:
                    edges.append((t["received_at"], 1))
                    edges.append((t["received_at"] + t["e2e_s"], -1))
    peak = running = 0
    for _, d in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += d
        peak = max(peak, running)
    return peak


def _bound(cell: Cell, window_s: float, excess: int, replicas: int) -> float:
    """docs/policies.md: with Redis, L + r*W (+ excess for tokens) whatever the replica count; fail-open,
    each replica holds its own max(1, floor(share*L)) bucket."""
    limit = cell.limit
    if not cell.redis:
        limit = replicas * max(1, int(limit * LOCAL_SHARE))
    if cell.kind == "concurrency":
        return float(limit)
    refill = limit * window_s / 60
    return limit + refill + (excess if cell.kind == "tpm" else 0)


async def _measure(cell: Cell, gateways: list[str], sims: list[str], seconds: float, replicas: int) -> Row:
    since = time.time()
    run = Run(cell, gateways, seconds)
    await run.go(sims)
    admitted = run.done
    window = max((d.ended for d in admitted), default=seconds)
    excess = sum(max(0, d.used - d.reserved) for d in admitted if d.used is not None)
    if cell.kind == "rpm":
        measured = float(len(admitted))
    elif cell.kind == "tpm":
        measured = float(sum(d.used or 0 for d in admitted))
    else:
        await asyncio.sleep(0.2)
        measured = float(await _backend_peak(sims, since))
    return Row(cell.name, cell.scope, cell.kind, cell.redis, cell.limit, round(window, 2), len(admitted), measured,
               measured - cell.limit, excess, round(_bound(cell, window, excess, replicas), 1), run.refused,
               run.retries, sum(d.repeated for d in admitted), run.errors)


def _print(rows: list[Row], replicas: int) -> None:
    print(f"\n{replicas} gateway replicas, one redis-server, {CLIENTS} clients per row")
    head = (f"{'row':<26}{'limit':>7}{'W s':>6}{'admitted':>9}{'measured':>10}{'overshoot':>10}"
            f"{'excess':>8}{'bound':>9}{'slack':>8}{'429s':>6}{'same id':>8}  errors")
    print(head)
    for r in rows:
        slack = r.bound - r.measured
        excess = str(r.excess) if r.kind == "tpm" else "-"
        print(f"{r.cell:<26}{r.limit:>7}{r.window_s:>6.1f}{r.admitted:>9}{r.measured:>10.0f}{r.overshoot:>10.0f}"
              f"{excess:>8}{r.bound:>9.1f}{slack:>8.1f}{r.refused:>6}{r.repeated_id:>8}  {r.errors or ''}")
    broken = [r.cell for r in rows if r.measured > r.bound]
    print("every row within its bound" if not broken else f"OVER THE BOUND: {broken}")


async def _fleet_run(replicas: int, cells: list[Cell], seconds: float) -> list[Row]:
    """Fresh processes (and a fresh Redis) for one replica count; the rows of every cell."""
    with tempfile.TemporaryDirectory(prefix="overshoot-") as tmp_name:
        tmp = Path(tmp_name)
        redis = start_redis(tmp)
        procs: list[Proc] = [redis]
        try:
            sims = [start_sim(tmp, MODEL, ["--profile", "tiny", "--request-log-size", "20000"]) for _ in range(2)]
            procs += sims
            gws = [start_gateway(tmp, _config(cells, redis, sims)) for _ in range(replicas)]
            procs += gws
            gateways = [f"http://127.0.0.1:{g.port}" for g in gws]
            sim_urls = [f"http://127.0.0.1:{s.port}" for s in sims]
            # Warm up every replica's estimator (it learns how the backend counts prompts).
            async with aiohttp.ClientSession() as s:
                for g in gateways:
                    for _ in range(5):
                        async with s.post(g + "/v1/chat/completions", headers={
                                "authorization": f"Bearer {WARM_KEY}", "content-type": "application/json"},
                                data=orjson.dumps({"model": MODEL, "max_tokens": 2, "messages": [
                                    {"role": "user", "content": "warm up"}]})) as r:
                            assert r.status == 200, await r.text()
            rows: list[Row] = []
            for cell in cells:
                if not cell.redis and redis.popen.poll() is None:
                    redis.kill()
                    await asyncio.sleep(0.5)
                rows.append(await _measure(cell, gateways, sim_urls, seconds, replicas))
                print(f"  {replicas} replicas, {rows[-1].cell}: {rows[-1].measured:.0f} (bound {rows[-1].bound})",
                      flush=True)
            return rows
        finally:
            for p in reversed(procs):
                p.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="1,2", help="replica counts to run, one fleet each (1 is the baseline)")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long each row's clients hammer")
    ap.add_argument("--out", default=str(ROOT / "loadtests" / "results" / "overshoot.json"))
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    kinds, scopes = ("rpm", "tpm", "concurrency"), ("key", "tenant", "model")
    cells = [Cell(s, k) for s in scopes for k in kinds] + [Cell("key", k, redis=False) for k in kinds]
    load = os.getloadavg()
    results = {n: await _fleet_run(n, cells, args.seconds) for n in counts}
    for n, rows in results.items():
        _print(rows, n)
    if len(counts) > 1:
        base, top = results[counts[0]], results[counts[-1]]
        print(f"\novershoot past the limit, {counts[0]} vs {counts[-1]} replicas (measured - limit)")
        for a, b in zip(base, top, strict=True):
            print(f"  {a.cell:<26}{a.overshoot:>8.0f}{b.overshoot:>8.0f}")
    print(f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; at end "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "seconds": args.seconds,
        "clients": CLIENTS, "local_share": LOCAL_SHARE, "limits": LIMITS, "load_average": load,
        "runs": {str(n): [asdict(r) for r in rows] for n, rows in results.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
