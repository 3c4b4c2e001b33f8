"""Failover as clients see it (issue 10): replicas killed, failing, stalling; all down; drain on SIGTERM.

Real processes: simulators with their fault switches, redis-server, the gateway, the openai SDK with
`max_retries=0` (so every recovery is the gateway's own).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.procs import Proc, free_port, start_gateway, start_redis, start_sim

# Outage drills (kills, restarts, bursts) wait more than they compute: `make test-outage`, run by .ci/run.
pytestmark = [pytest.mark.slow, pytest.mark.outage]

MODEL = "sim-llama"
RESILIENCE = {"timeouts": {"first_byte_s": 30, "stall_s": 2.0, "total_s": 90},
              "circuit": {"consecutive_failures": 3, "open_s": 30}}


@contextlib.contextmanager
def fleet(tmp: Path, n: int = 3, resilience: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
          sim_args: list[str] | None = None) -> Iterator[tuple[Proc, list[Proc], Proc]]:
    redis = start_redis(tmp)
    sims = [start_sim(tmp, MODEL, sim_args or ["--profile", "tiny"]) for _ in range(n)]
    cfg = {"server": {"debug_headers": True},
           "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                        for i, s in enumerate(sims)],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "resilience": resilience or RESILIENCE, **(extra or {})}
    gw = start_gateway(tmp, cfg)
    try:
        yield gw, sims, redis
    finally:
        for p in (gw, *sims, redis):
            p.stop()


def _aclient(gw: Proc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0,
                              timeout=60)


async def _afaults(sim: Proc, **faults: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{sim.port}/admin/faults",
                                                    data=json.dumps(faults)) as r:
        assert r.status == 200, await r.text()


def _faults(sim: Proc, **faults: Any) -> None:
    asyncio.run(_afaults(sim, **faults))


MESSAGES = [{"role": "user", "content": "Tell me a long story about gateways."}]


async def _stream(client: openai.AsyncOpenAI, seed: int, max_tokens: int) -> tuple[str, int, float]:
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, max_tokens=max_tokens, seed=seed,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, completion = "", -1
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            completion = chunk.usage.completion_tokens
    return text, completion, time.monotonic() - started


async def _whole(client: openai.AsyncOpenAI, seed: int, max_tokens: int) -> tuple[str, int]:
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens,  # type: ignore[arg-type]
                                                 seed=seed, extra_body={"ignore_eos": True})
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.completion_tokens


async def _reference(sim: Proc, seed: int, max_tokens: int) -> str:
    direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sim.port}/v1", api_key="x", max_retries=0)
    try:
        return (await _whole(direct, seed, max_tokens))[0]
    finally:
        await direct.close()


def test_a_replica_killed_under_load_costs_no_client_an_error_or_a_token(tmp_path: Path) -> None:
    max_tokens = 80
    with fleet(tmp_path) as (gw, sims, _):
        async def go() -> tuple[list[Any], list[Any], dict[int, str]]:
            client = _aclient(gw)
            streams = [asyncio.create_task(_stream(client, seed, max_tokens)) for seed in range(15)]
            wholes = [asyncio.create_task(_whole(client, 100 + seed, max_tokens)) for seed in range(6)]
            await _until_streaming(sims[1])
            sims[1].kill()  # SIGKILL mid-load: in-flight streams and requests on it break
            got_streams = await asyncio.gather(*streams, return_exceptions=True)
            got_wholes = await asyncio.gather(*wholes, return_exceptions=True)
            refs = {seed: await _reference(sims[0], seed, max_tokens) for seed in range(15)}
            await client.close()
            return got_streams, got_wholes, refs

        got_streams, got_wholes, refs = asyncio.run(go())
        errors = [g for g in [*got_streams, *got_wholes] if isinstance(g, BaseException)]
        assert not errors, errors[:3]
        for seed, (text, completion, _) in enumerate(got_streams):
            assert completion == max_tokens, (seed, completion)
            assert text == refs[seed], f"stream {seed}: resumed text differs from an unbroken one"
        assert all(c == max_tokens for _, c in got_wholes)
        metrics = _metrics(gw)
        assert _sum(metrics, "gravity_stream_resumes_total") >= 1, "the kill broke no stream: the test proved nothing"


@pytest.mark.parametrize("status", [500, 429, 503])
def test_bursts_of_errors_from_one_replica_are_invisible(tmp_path: Path, status: int) -> None:
    with fleet(tmp_path) as (gw, sims, _):
        _faults(sims[0], fail_next=20, fail_status=status)

        async def go() -> list[Any]:
            client = _aclient(gw)
            try:
                return await asyncio.gather(*(_whole(client, i, 4) for i in range(40)), return_exceptions=True)
            finally:
                await client.close()

        got = asyncio.run(go())
        assert not [g for g in got if isinstance(g, BaseException)], [g for g in got if isinstance(g, BaseException)][:3]
        assert _sum(_metrics(gw), "gravity_upstream_retries_total") >= 1


def test_a_stalled_replica_resumes_its_streams_and_its_circuit_opens(tmp_path: Path) -> None:
    with fleet(tmp_path) as (gw, sims, _):
        _faults(sims[0], stall_after=10)

        async def go() -> list[Any]:
            client = _aclient(gw)
            try:
                return await asyncio.gather(*(_stream(client, i, 60) for i in range(18)), return_exceptions=True)
            finally:
                await client.close()

        got = asyncio.run(go())
        assert not [g for g in got if isinstance(g, BaseException)]
        assert all(c == 60 for _, c, _ in got)  # type: ignore[misc]
        described = _admin(gw)
        assert described["sim-0"]["circuit"] in ("open", "half_open"), described["sim-0"]
        before = _sim_requests(sims[0])

        async def later() -> None:
            client = _aclient(gw)
            try:
                await asyncio.gather(*(_stream(client, 50 + i, 10) for i in range(9)))
            finally:
                await client.close()

        asyncio.run(later())
        assert _sim_requests(sims[0]) == before, "requests still went to the replica whose circuit is open"


@pytest.mark.parametrize("fault", ["error", "stall"])
def test_an_open_circuit_is_probed_and_closes_once_the_replica_heals(tmp_path: Path, fault: str) -> None:
    """Open circuits take no traffic, yet the time-based half-open probe must still reach them: with the
    endpoint filtered out of routing nothing would ever ask its circuit, and it would stay open for ever."""
    resilience = {"timeouts": {"first_byte_s": 30, "stall_s": 1.0, "total_s": 90},
                  "circuit": {"consecutive_failures": 3, "open_s": 0.5, "max_open_s": 2.0}}
    with fleet(tmp_path, resilience=resilience) as (gw, sims, _):
        if fault == "error":
            _faults(sims[0], fail_next=10_000, fail_status=500)
        else:
            _faults(sims[0], stall_after=3)

        async def load(client: openai.AsyncOpenAI, seconds: float, seed: int) -> tuple[list[Any], set[str]]:
            """Streams three at a time for `seconds`; the circuit states sim-0 showed between them."""
            got: list[Any] = []
            states: set[str] = set()
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                got += await asyncio.gather(*(_stream(client, seed + len(got) + i, 12) for i in range(3)),
                                            return_exceptions=True)
                states.add(await _circuit(gw, "sim-0"))
            return got, states

        async def go() -> None:
            client = _aclient(gw)
            try:
                got, _ = await load(client, 0.1, 0)
                while await _circuit(gw, "sim-0") != "open":
                    more, _ = await load(client, 0.1, len(got))
                    got += more
                    assert len(got) < 120, "sim-0's circuit never opened"
                # Still sick: only the probes of the back-off reach it, none of them closes the circuit.
                before = await _sim_requests_async(sims[0])
                sick, states = await load(client, 3.0, 1000)
                got += sick
                probes = await _sim_requests_async(sims[0]) - before
                assert 1 <= probes <= 4, f"{probes} requests reached the sick replica in 3 s"
                assert "closed" not in states, "a probe of the still-sick replica closed its circuit"
                # Healed: within the longest back-off (2 s) it is probed, the probe succeeds, traffic returns.
                await _afaults(sims[0], fail_next=0, stall_after=None)
                before = await _sim_requests_async(sims[0])
                healed, _ = await load(client, 4.0, 2000)
                got += healed
                assert await _circuit(gw, "sim-0") == "closed"
                assert await _sim_requests_async(sims[0]) - before >= 3, "the healed replica got no traffic back"
                errors = [g for g in got if isinstance(g, BaseException)]
                assert not errors, errors[:3]
                assert all(c == 12 for _, c, _ in got)
            finally:
                await client.close()

        asyncio.run(go())


def test_slow_metrics_mean_unknown_load_not_a_dead_fleet(tmp_path: Path) -> None:
    """Every replica's /metrics turns slower than the scrape timeout: their figures go stale, yet they
    answer /health and serve, so the model must keep answering (not 503 no_healthy_backend)."""
    with fleet(tmp_path) as (gw, sims, _):
        async def go() -> list[Any]:
            client = _aclient(gw)
            try:
                assert (await _whole(client, 0, 4))[1] == 4
                for sim in sims:
                    await _afaults(sim, metrics_delay_ms=5000)  # the scrape timeout is 0.5 s
                await asyncio.sleep(3.0)  # past stale_after_s (2 s): no endpoint has fresh metrics now
                got = []
                for i in range(10):
                    got += await asyncio.gather(*(_whole(client, 10 * i + j, 4) for j in range(3)),
                                                return_exceptions=True)
                    await asyncio.sleep(0.2)
                return got
            finally:
                await client.close()

        got = asyncio.run(go())
        errors = [g for g in got if isinstance(g, BaseException)]
        assert not errors, errors[:3]
        described = _admin(gw)
        assert not any(e["fresh"] for e in described.values()), "some scrape got through: the test proved nothing"
        assert all(e["healthy"] for e in described.values()), described


def test_all_replicas_down_is_a_fast_503_with_retry_after(tmp_path: Path) -> None:
    with fleet(tmp_path) as (gw, sims, _):
        for s in sims:
            s.kill()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
            assert time.monotonic() - started < 1.0
            assert info.value.status_code == 503
            assert int(info.value.response.headers["retry-after"]) >= 1
            assert info.value.body["code"] == "no_healthy_backend"  # type: ignore[index]


def test_a_model_with_no_serving_endpoint_falls_back(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    sim_b = start_sim(tmp_path, "model-b", ["--profile", "tiny"])
    dead = free_port()
    cfg = {"server": {"debug_headers": True},
           "backends": [{"name": "a-0", "url": f"http://127.0.0.1:{dead}", "models": ["model-a"]},
                        {"name": "b-0", "url": f"http://127.0.0.1:{sim_b.port}", "models": ["model-b"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "resilience": {"fallbacks": {"model-a": ["model-b"]}}}
    gw = start_gateway(tmp_path, cfg)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="model-a", messages=MESSAGES, max_tokens=3, stream=stream)  # type: ignore[arg-type]
            assert raw.headers["x-gravity-fallback-model"] == "model-b"
            assert raw.headers["x-gravity-backend"] == "b-0"
            parsed = raw.parse()
            model = parsed.model if not stream else next(iter(parsed)).model  # type: ignore[union-attr,call-overload]
            assert model == "model-b"
    finally:
        for p in (gw, sim_b, redis):
            p.stop()


def test_sigterm_drains_open_streams_then_exits_zero(tmp_path: Path) -> None:
    resilience = {**RESILIENCE, "drain": {"grace_s": 1.0, "drain_timeout_s": 20}}
    with fleet(tmp_path, resilience=resilience, sim_args=["--profile", "tiny", "--time-scale", "0.25"]) as (gw, _, _):
        async def go() -> tuple[list[Any], int, bool, int | None]:
            client = _aclient(gw)
            streams = [asyncio.create_task(_stream(client, i, 40)) for i in range(20)]
            await asyncio.sleep(0.5)
            gw.popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{gw.port}/ready") as r:
                    ready = r.status
                # Within the grace period new requests are still served.
                async with s.post(f"http://127.0.0.1:{gw.port}/v1/chat/completions",
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}) as r:
                    served_in_grace = r.status == 200
            await asyncio.sleep(1.5)
            refused = None
            try:
                _, w = await asyncio.open_connection("127.0.0.1", gw.port)
                w.close()
            except OSError:
                refused = 1
            got = await asyncio.gather(*streams, return_exceptions=True)
            await client.close()
            return got, ready, served_in_grace, refused

        got, ready, served_in_grace, refused = asyncio.run(go())
        assert ready == 503
        assert served_in_grace
        assert not [g for g in got if isinstance(g, BaseException)], got[:3]
        assert all(c == 40 for _, c, _ in got)  # type: ignore[misc]
        assert refused == 1, "new connections must be refused after the grace period"
        assert gw.popen.wait(30) == 0


# -- helpers -----------------------------------------------------------------------------------------
async def _until_streaming(sim: Proc) -> None:
    """Wait until `sim` is midway through some request, so killing it breaks work in flight."""
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(f"http://127.0.0.1:{sim.port}/admin/requests") as r:
                records = (await r.json())["requests"]
            if any(rec["status"] == "running" and rec["completion_tokens"] >= 5 for rec in records):
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the replica never started streaming")


def _get(url: str) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return await r.text()
    return asyncio.run(go())


def _metrics(gw: Proc) -> str:
    return _get(f"http://127.0.0.1:{gw.port}/metrics")


def _sum(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith((name + "{", name + " ")))


async def _aget(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def _circuit(gw: Proc, backend: str) -> str:
    """The circuit state the gateway published (read from /metrics: asking the admin API would move it)."""
    for line in (await _aget(f"http://127.0.0.1:{gw.port}/metrics")).splitlines():
        if line.startswith(f'gravity_circuit_state{{backend="{backend}"') and line.endswith(" 1.0"):
            return line.split('state="', 1)[1].split('"', 1)[0]
    return "closed"


def _admin(gw: Proc) -> dict[str, Any]:
    return dict(json.loads(_get(f"http://127.0.0.1:{gw.port}/admin/backends")))


async def _sim_requests_async(sim: Proc) -> int:
    return len(json.loads(await _aget(f"http://127.0.0.1:{sim.port}/admin/requests"))["requests"])


def _sim_requests(sim: Proc) -> int:
    return len(json.loads(_get(f"http://127.0.0.1:{sim.port}/admin/requests"))["requests"])
