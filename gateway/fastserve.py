"""Runs the gateway's ASGI app on its own HTTP protocol (`server.engine: fast`): lifespan, signals, drain.

The same contract as the uvicorn path in gateway/serve.py: SIGTERM begins the drain (/ready 503 at
once, new requests served for `grace_s`), then the listener closes and in-flight requests get up to
`drain_timeout_s`; SIGINT or a second signal stops accepting now. Exit status 0 either way.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import MutableMapping
from typing import Any

from gateway.app import GatewayApp
from gateway.drain import Drain
from gateway.httpserver import HttpProtocol, ServerState

log = logging.getLogger("gravity.server")

__all__ = ["run_fast"]


class _Lifespan:
    """The ASGI lifespan protocol against the app: startup before listening, shutdown after the drain."""

    def __init__(self, app: GatewayApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        return await self._events.get()

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self._started.set_exception(RuntimeError(message.get("message") or "startup failed"))
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and not self._stopped.done():
            self._stopped.set_result(None)

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:
            for fut in (self._started, self._stopped):
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("lifespan cancelled"))
            raise

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._events.put({"type": "lifespan.startup"})
        await self._started

    async def shutdown(self) -> None:
        await self._events.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(Exception):
            await self._stopped
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task


async def _serve(app: GatewayApp, host: str, port: int, drain: Drain) -> None:
    loop = asyncio.get_running_loop()
    lifespan_state: dict[str, Any] = {}
    lifespan = _Lifespan(app, lifespan_state)
    await lifespan.startup()
    state = ServerState(app, lifespan_state)
    guarded: Any = app.connection_guard.protocol_class(HttpProtocol)
    server = await loop.create_server(lambda: guarded(state), host, port, backlog=2048, reuse_address=True)
    log.info("gravity serving on http://%s:%d (engine: fast)", host, port)
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        if sig != signal.SIGTERM or drain.draining:
            stop.set()
            return
        drain.begin()
        loop.call_later(drain.cfg.grace_s, stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        state.closing = True
        server.close()
        for conn in list(state.connections):
            conn.shutdown()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=max(1.0, drain.cfg.drain_timeout_s))
        for conn in list(state.connections):
            conn.close()
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=5)
        await lifespan.shutdown()


def run_fast(app: GatewayApp, host: str, port: int, drain: Drain) -> None:
    """Serve until stopped, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the server does not need it
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(app, host, port, drain))
