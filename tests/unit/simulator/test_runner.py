"""Runner: real-time stepping with a time scale, and aborting when the consumer goes away."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from simulator.engine import Engine, SimRequest
from simulator.profiles import get_profile
from simulator.runner import EngineRunner


@pytest.fixture
async def runner(request: pytest.FixtureRequest) -> AsyncIterator[EngineRunner]:
    scale = getattr(request, "param", 1.0)
    r = EngineRunner(lambda: Engine(get_profile("tiny")), scale)
    task = asyncio.create_task(r.run())
    yield r
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_tokens_are_spread_over_real_time(runner: EngineRunner) -> None:
    started = time.monotonic()
    stamps = []
    async with runner.submit(SimRequest("a", list(range(32)), 10)) as stream:
        async for ev in stream:
            stamps.append(time.monotonic() - started)
    assert len(stamps) == 10 and ev.finished
    # 9 decode steps of ~5.5 ms each after the first token.
    assert stamps[-1] - stamps[0] >= 0.045


@pytest.mark.parametrize("runner", [50.0], indirect=True)
async def test_time_scale_speeds_up_the_clock(runner: EngineRunner) -> None:
    started = time.monotonic()
    async for _ in runner.submit(SimRequest("a", [1, 2, 3], 200)):
        pass
    # 200 steps of ~5.5 ms model time would take 1.1 s unscaled.
    assert time.monotonic() - started < 0.6
    assert runner.engine.stats().e2e.total > 1.0


async def test_cancelled_consumer_aborts_its_request(runner: EngineRunner) -> None:
    async def consume() -> None:
        async for _ in runner.submit(SimRequest("a", list(range(64)), 1000)):
            pass

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    assert runner.engine.stats().num_running == 1
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    st = runner.engine.stats()
    assert st.num_running == 0 and st.kv_cache_usage == 0.0 and not runner.engine.has_work()


async def test_reset_ends_inflight_requests_and_empties_cache(runner: EngineRunner) -> None:
    stream = runner.submit(SimRequest("a", list(range(64)), 1000))
    await anext(stream)
    runner.reset()
    rest = [ev async for ev in stream]
    assert rest[-1].finish_reason == "abort" and runner.restarts == 1
    assert runner.engine.cached_prefix_tokens(list(range(64))) == 0
