"""Real-time asyncio driver for the engine: steps it in a background task and sleeps each step.

Time can run `time_scale` times faster than real time; a consumer that stops early aborts its request.
Steps follow a deadline timeline, so the time spent computing a step and relaying its tokens comes
out of the sleep rather than being added to model time; `keep_up()` says how well that held.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from simulator.engine import Engine, SimRequest, TokenEvent


class RequestStream:
    """Token events for one request, in order; closing it before the end aborts the request."""

    def __init__(self, runner: EngineRunner, request_id: str) -> None:
        self.request_id = request_id
        self._runner = runner
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if event.finished:
            self._done = True
            self._runner._forget(self.request_id)
        return event

    def _put(self, event: TokenEvent) -> None:
        self._queue.put_nowait(event)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._runner._forget(self.request_id)
            self._runner.engine.abort(self.request_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class EngineRunner:
    """Owns one engine at a time; `reset()` swaps in a fresh one (a simulated restart)."""

    def __init__(self, engine_factory: Callable[[], Engine], time_scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self._factory = engine_factory
        self.engine = engine_factory()
        self.time_scale = time_scale
        self._clock = clock
        self._origin = clock()
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self.restarts = 0
        self.started_at = time.time()
        self.steps = 0
        self.engine_busy_s = 0.0
        """Model time the engine spent stepping (the sum of step durations)."""
        self.wall_busy_s = 0.0
        """Wall time those steps took, sleeps included; engine_busy_s / time_scale when keeping up."""
        self.slipped_s = 0.0
        """Model time lost when the runner fell more than `max_behind_s` behind its timeline."""
        self.max_behind_s = 0.002
        """Overshoot (wall seconds) made up by shortening later sleeps; beyond it the slip is kept."""
        self._deadline: float | None = None

    def now(self) -> float:
        """Engine time: wall time since start, times `time_scale`."""
        return (self._clock() - self._origin) * self.time_scale

    def submit(self, req: SimRequest) -> RequestStream:
        """Queue `req` (arrival = now); raises ValueError for requests the engine rejects."""
        req.arrival = self.now()
        self.engine.add_request(req)
        stream = RequestStream(self, req.request_id)
        self._streams[req.request_id] = stream
        self._wake.set()
        return stream

    def reset(self) -> None:
        """Restart with an empty cache; in-flight requests end with finish_reason "abort"."""
        self.engine = self._factory()
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            stream._put(TokenEvent(rid, [], False, True, "abort", 0, 0, self.now()))
        self.restarts += 1
        self.started_at = time.time()

    def keep_up(self) -> float:
        """Model time per wall time while busy, over time_scale: 1.0 when the runner keeps up with its
        scale, 0.5 when the process is too slow and model time runs at half the asked speed."""
        if self.wall_busy_s <= 0:
            return 1.0
        return self.engine_busy_s / (self.wall_busy_s * self.time_scale)

    async def run(self) -> None:
        """The engine loop; run it as a background task for the lifetime of the server."""
        while True:
            engine = self.engine
            if not engine.has_work():
                self._wake.clear()
                self._deadline = None
                await self._wake.wait()
                continue
            started = self._clock()
            if self._deadline is None:
                self._deadline = started
            elif started - self._deadline > self.max_behind_s:
                # Too far behind to catch up by skipping sleeps: the lost time stays lost.
                self.slipped_s += (started - self._deadline) * self.time_scale
                self._deadline = started
            out = engine.step(self.now())
            self.steps += 1
            self.engine_busy_s += out.duration
            self._deadline += out.duration / self.time_scale
            # Tokens become visible when the step ends, as with a real GPU forward pass. The step's
            # own compute and the relaying of the previous step's tokens come out of this sleep.
            await asyncio.sleep(max(0.0, self._deadline - self._clock()))
            self.wall_busy_s += self._clock() - started
            if engine is not self.engine:
                continue
            for event in out.events:
                stream = self._streams.get(event.request_id)
                if stream is not None:
                    stream._put(event)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
