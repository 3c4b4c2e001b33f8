"""`gravity extproc`: the ExternalProcessor and gRPC health services on one grpc.aio server.

The gateway's parts (datastore, collector, Redis, admission, state) are built and started exactly as for
`gravity serve`; only the edge differs. Health: `liveness` serves from the start, `readiness` and
the ext_proc service name once the first endpoint scrape has completed (the datastore synced).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.config import GatewayConfig
from gateway.core import Core, build_core
from gateway.extproc.decider import Decider, GatewayDecider
from gateway.extproc.pb import SERVICE_NAME, ep, ep_grpc
from gateway.extproc.stream import ExtProcStream

__all__ = ["ExtProcServicer", "TlsFiles", "serve"]

log = logging.getLogger("gravity.extproc")

LIVENESS = "liveness"
READINESS = "readiness"


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, decider: Decider, cfg: GatewayConfig) -> None:
        self.decider = decider
        self.cfg = cfg

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[ep.ProcessingResponse]:
        stream = ExtProcStream(self.decider, max_body_bytes=self.cfg.server.max_body_bytes,
                               body_mode=self.cfg.extproc.body_mode,
                               debug_headers=self.cfg.server.debug_headers,
                               read_response=self.cfg.extproc.read_response)
        cancelled = False
        try:
            async for msg in request_iterator:
                for out in await stream.handle(msg):
                    yield out
                if stream.done:
                    break
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # Envoy cancels the stream when the client leaves; shield the settlement from it.
            await asyncio.shield(stream.close(cancelled=cancelled))


@dataclass(frozen=True)
class TlsFiles:
    """PEM certificate chain and private key, read before the event loop starts."""

    cert: bytes
    key: bytes

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> TlsFiles:
        with open(cert_path, "rb") as c, open(key_path, "rb") as k:
            return cls(c.read(), k.read())


async def serve(cfg: GatewayConfig, *, tls: TlsFiles | None = None, gateway: Core | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT): start the gateway parts, then serve."""
    gw = gateway or build_core(cfg)
    decider = GatewayDecider(gw, cfg.extproc)
    health = HealthServicer()
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    for name in (READINESS, SERVICE_NAME, ""):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(decider, cfg), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{cfg.extproc.host}:{cfg.extproc.port}"
    if tls is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.cert)]))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await decider.resolve(loop)
    await server.start()
    log.info("ext_proc listening on %s", address)
    try:
        await gw.start()  # one scrape before ready, as `serve` does before its first request
        decider.started = True
        for name in (READINESS, SERVICE_NAME, ""):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await stop.wait()
        await health.enter_graceful_shutdown()
        await server.stop(grace=5)
    finally:
        await gw.stop()
