"""`gravity serve`: the gateway under uvicorn or its own server, with our connection limits and a graceful drain.

SIGTERM drains (docs/resilience.md, "Drain"): /ready turns 503 at once and new requests are still
served for `resilience.drain.grace_s`; then the server stops accepting and in-flight requests get
up to `drain_timeout_s`; the process exits 0. SIGINT (Ctrl-C) or a second signal stops accepting now.
"""
from __future__ import annotations

import asyncio
import gc
import signal
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.drain import Drain
from gateway.fastserve import run_fast
from gateway.logs import configure_logging

__all__ = ["serve"]


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded among uvicorn's captured signals: it would re-raise SIGTERM after the shutdown,
        # and the process would end killed by it instead of with status 0.
        if sig != signal.SIGTERM or self.drain.draining:
            self.should_exit = True
            return
        self.drain.begin()
        asyncio.get_running_loop().call_later(self.drain.cfg.grace_s, self._after_grace)

    def _after_grace(self) -> None:
        self.should_exit = True


def serve(cfg: GatewayConfig, log_level: str | None = None) -> None:
    log_level = log_level or cfg.logging.level
    configure_logging(log_level, cfg.logging.format, cfg.logging.access_log)
    app = create_app(cfg)
    # Everything allocated so far lives for the process: move it out of the collector's sight and
    # collect young objects less often (measured: -25% CPU per request, p99 66 -> 17 ms at c=32;
    # docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    if cfg.server.engine == "fast":
        run_fast(app, cfg.server.host, cfg.server.port, app.core.drain)
        return
    drain = cfg.resilience.drain
    config = uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, loop="uvloop",
        # Connection limits of our own wrap the server's protocol (server.limits, gateway/conn_guard.py).
        http=app.connection_guard.protocol_class(HttpToolsProtocol),
        # uvicorn's loggers go through the gateway's handler (its format); its own access log stays off.
        access_log=False, log_config=None, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=max(1, round(drain.drain_timeout_s)),
        # The gateway decides whom to believe about client addresses (server.trusted_proxies);
        # uvicorn would otherwise take X-Forwarded-For from any loopback peer.
        proxy_headers=False)
    DrainingServer(config, app.core.drain).run()
