"""StallWatch: a wait for a chunk longer than the stall timeout cancels the stream's task, as a timeout
per wait would; time spent elsewhere (sending to a slow client) never counts."""
from __future__ import annotations

import asyncio
import time

import pytest

from gateway.watchdog import StallWatch


async def test_a_wait_longer_than_the_stall_cancels_and_says_so() -> None:
    watch = StallWatch(0.05, time.monotonic() + 10, time.monotonic)
    watch.since = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert watch.stalled()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    watch.close()


async def test_waits_each_shorter_than_the_stall_never_cancel_however_long_the_stream() -> None:
    watch = StallWatch(0.06, time.monotonic() + 10, time.monotonic)
    for _ in range(8):  # 8 x 20 ms: well past the stall in total
        watch.since = time.monotonic()
        await asyncio.sleep(0.02)
        watch.since = None
    assert not watch.fired
    watch.close()


async def test_time_spent_not_waiting_is_no_stall() -> None:
    watch = StallWatch(0.03, time.monotonic() + 10, time.monotonic)
    await asyncio.sleep(0.12)  # e.g. blocked sending to a slow client
    watch.since = time.monotonic()
    await asyncio.sleep(0.01)
    watch.since = None
    assert not watch.fired
    watch.close()


async def test_the_request_deadline_bounds_a_wait() -> None:
    watch = StallWatch(10, time.monotonic() + 0.05, time.monotonic)
    watch.since = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert watch.stalled()
    watch.close()


async def test_another_cancellation_is_not_a_stall() -> None:
    async def stream() -> bool:
        watch = StallWatch(10, time.monotonic() + 10, time.monotonic)
        watch.since = time.monotonic()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return watch.stalled()
        finally:
            watch.close()
        return True

    task = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    task.cancel()  # the client left
    assert await task is False


async def test_a_deadline_cancels_once_it_passes_and_says_so() -> None:
    from gateway.watchdog import Deadline

    deadline = Deadline(0.03)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert deadline.expired()
    deadline.close()
    quick = Deadline(1)
    await asyncio.sleep(0.01)
    quick.close()
    await asyncio.sleep(0)
    assert not quick.fired
