"""A stream's stall deadline as one timer for the whole stream, not one per chunk.

`asyncio.timeout` around each chunk's wait builds a Timeout, schedules a timer and cancels it, for
every chunk relayed. `StallWatch` keeps one timer: the relay only notes when it starts waiting for
a chunk (`since`) and that it stopped (None), and a timer that fires early is set again for the due
time. When a wait lasts `stall_s` (or reaches the request's deadline) the task is cancelled, as
asyncio.timeout would do; `stalled()` tells that cancellation apart from any other (the client
leaving). Time spent sending to the client is not a wait: it never counts as a stall.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline", "StallWatch"]


class StallWatch:
    __slots__ = ("_cancelling", "_clock", "_deadline", "_handle", "_loop", "_stall", "_task", "fired", "since")

    def __init__(self, stall_s: float, deadline: float, clock: Callable[[], float]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._loop = asyncio.get_running_loop()
        self._clock = clock
        self._stall = stall_s
        self._deadline = deadline
        self.fired = False
        self.since: float | None = None
        """When the current wait for a chunk began (on `clock`'s scale); None while not waiting."""
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._next(clock()), self._check)

    def _next(self, now: float) -> float:
        """A timer for a wait that may begin now: a stall from now, or the deadline if sooner (a wait
        that begins after the deadline is the caller's to refuse)."""
        left = self._deadline - now
        return left if 0 < left < self._stall else self._stall

    def _check(self) -> None:
        since = self.since
        if since is None:  # sending, not waiting: look again later
            self._handle = self._loop.call_later(self._next(self._clock()), self._check)
            return
        due = since + self._stall
        due = min(due, self._deadline)
        now = self._clock()
        if now < due:
            self._handle = self._loop.call_later(due - now, self._check)
            return
        self._handle = None
        self.fired = True
        self._task.cancel()

    def stalled(self) -> bool:
        """In an `except CancelledError`: True when this watch cancelled the task (its cancel is then
        taken back, as asyncio.timeout does); False for any other cancellation."""
        return self.fired and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Deadline:
    """`asyncio.timeout(delay)` for the calling task in one timer and no coroutine of its own: the
    task is cancelled when `delay` passes; `expired()` tells that cancellation from any other."""

    __slots__ = ("_cancelling", "_handle", "_task", "fired")

    def __init__(self, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """In an `except CancelledError`: True when the deadline cancelled the task (taken back)."""
        return self.fired and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
