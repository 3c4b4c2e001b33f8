"""The composition root's work: build every long-lived part from config, wire each to what it needs.

`build_core(cfg)` is shared by the two ways traffic comes in: `create_app` (the HTTP proxy) and
`gravity extproc` (the Envoy sidecar) put their own edge in front of the same parts, so admission,
routing, sessions and state have one implementation. No part reaches into this object: each got its
collaborators as constructor arguments; `Core` only keeps them together for start/stop and the edges.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.dispatcher import Dispatcher
from gateway.drain import Drain
from gateway.kv_subscriber import KVSubscriber, build_kv_events
from gateway.logs import AccessLog, OutcomeLog
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.rawclient import RawTransport
from gateway.redis_conn import RedisHandle, open_redis
from gateway.state import SessionAffinity, StateStore
from gateway.state.inflight import SharedInflight
from gateway.state.store import Client
from gateway.tasks import cancel_tasks
from gateway.telemetry import NOOP, Tracing, build_tracing
from gateway.telemetry.state import traced_store_class
from gateway.transport import AiohttpTransport, Transport
from gateway.upstream import BackendTarget, TrustedProxies, Upstream
from policies.circuit import OPEN, CircuitBoard
from policies.retry_budget import RetryBudget
from routing.datastore import Datastore
from routing.health import HealthProber
from routing.kv.state import KVEventState
from routing.scheduler import Scheduler, build_scheduler
from routing.scraper import Collector
from routing.types import EndpointSpec

log = logging.getLogger("gravity")

__all__ = ["Core", "build_core"]


@dataclass
class Core:
    cfg: GatewayConfig
    metrics: GatewayMetrics
    outcomes: OutcomeLog
    access: AccessLog
    datastore: Datastore
    targets: dict[str, BackendTarget]
    scheduler: Scheduler
    upstream: Upstream
    admission: Admission
    store: StateStore
    sessions: SessionAffinity
    pipeline: Pipeline
    dispatcher: Dispatcher
    circuits: CircuitBoard
    collector: Collector
    prober: HealthProber
    drain: Drain
    trusted_proxies: TrustedProxies
    started_at: float = field(default_factory=time.time)
    redis: RedisHandle | None = None
    kv_state: KVEventState | None = None
    """The KV-event block index (docs/kv-events.md); None when no backend publishes events."""
    kv_subscriber: KVSubscriber | None = None
    tracing: Tracing = NOOP
    """Traces (docs/tracing.md): NOOP unless an OTLP endpoint is configured."""
    shared_inflight: SharedInflight | None = None
    """In-flight counts shared with the other gateway replicas through Redis (docs/state.md)."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def redis_client(self) -> Client:
        if self.redis is None:
            raise RuntimeError("Redis is used before the gateway started")
        return self.redis.client

    async def start(self) -> None:
        await self.tracing.start()
        await self.upstream.open()
        self.redis = open_redis(self.cfg.state, self.metrics.redis_op)
        # One scrape before serving, so /ready and routing start from real state.
        with contextlib.suppress(Exception):
            await self.collector.refresh_once()
        self._tasks.append(asyncio.create_task(self.collector.run(), name="gravity-collector"))
        self._tasks.append(asyncio.create_task(self.prober.run(), name="gravity-health"))
        await self.admission.start(self.redis.client, self.redis.pipe)
        if self.shared_inflight is not None:
            await self.shared_inflight.start()
        if self.kv_subscriber is not None:
            await self.kv_subscriber.start()

    async def stop(self) -> None:
        if self.kv_subscriber is not None:
            with contextlib.suppress(Exception):
                await self.kv_subscriber.stop()
        if self.shared_inflight is not None:
            with contextlib.suppress(Exception):
                await self.shared_inflight.stop()  # the others stop counting this replica at once
        with contextlib.suppress(Exception):
            await self.admission.stop()  # queued settlements reach Redis before it closes
        await cancel_tasks(self._tasks)
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.close()
            self.redis = None
        with contextlib.suppress(Exception):
            await self.tracing.stop()  # the last spans (bounded by OTEL_BSP_EXPORT_TIMEOUT)
        self.access.flush()  # the access lines of the last loop turn

    def configured_models(self) -> set[str]:
        return {m for b in self.cfg.backends for m in (b.models or ())}

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every configured (or discovered) model has a healthy backend and no drain began."""
        served = self.datastore.served_models()
        wanted = self.configured_models() or {m for e in self.datastore.snapshot() for m in (e.models or ())}
        missing = sorted(wanted - served)
        return (bool(served) and not missing and not self.drain.draining), missing


def build_core(cfg: GatewayConfig, transport: Transport | None = None) -> Core:
    """`transport` replaces the aiohttp one (unit tests script the backends through it, as httpx's
    `Client(transport=...)`)."""
    metrics = GatewayMetrics(cfg.metrics.key_label_max if cfg.metrics.key_label else 0)
    tracing = build_tracing(cfg.telemetry, metrics.registry)
    outcomes = OutcomeLog(log)
    access = AccessLog(cfg.logging.access_log)
    datastore = Datastore(stale_after_s=cfg.routing.stale_after_s)
    targets: dict[str, BackendTarget] = {}
    health_urls: dict[str, str] = {}
    for b in cfg.backends:
        metrics.backend_configured(b.name)  # its circuit series exist from the start
        target = BackendTarget.from_config(b)
        targets[b.name] = target
        if target.health_url:
            health_urls[b.name] = target.health_url
        datastore.upsert(EndpointSpec(
            name=b.name, url=b.url, models=frozenset(b.models) if b.models else None,
            models_url=target.models_url, metrics_url=target.metrics_url,
            scrape_metrics=target.metrics_url is not None,
        ))
    # KV events (docs/kv-events.md): the block index the precise prefix scorer reads, and its feed.
    kv_state, kv_subscriber = build_kv_events(cfg)
    if kv_state is not None:
        datastore.add_restart_listener(kv_state.drop)  # a restart the scraper sees clears that endpoint too
    scheduler = build_scheduler(cfg.routing, datastore, kv_events=kv_state)
    upstream = Upstream(cfg.server, cfg.resilience, client=cfg.upstream_client)
    res = cfg.resilience

    collector = Collector(datastore, upstream.fetcher(cfg.routing.scrape_timeout_s),
                          interval_s=cfg.routing.scrape_interval_s, timeout_s=cfg.routing.scrape_timeout_s,
                          unhealthy_after=cfg.routing.unhealthy_after_failures, probed=bool(health_urls))
    prober = HealthProber(datastore, upstream.fetcher(res.health.probe_timeout_s), health_urls,
                          interval_s=res.health.probe_interval_s, timeout_s=res.health.probe_timeout_s,
                          unhealthy_after=res.health.unhealthy_after)

    def circuit_changed(endpoint: str, state: str) -> None:
        datastore.set_circuit_open(endpoint, state == OPEN)
        metrics.circuit_changed(endpoint, state)
        if state == OPEN:
            outcomes.note(f"circuit:{endpoint}", "circuit of backend %s opened: it takes no traffic for now", endpoint)

    circuits = CircuitBoard(res.circuit_policy(), time.monotonic, circuit_changed, population=len(cfg.backends))
    datastore.add_restart_listener(circuits.forget)
    budget = RetryBudget(res.budget_policy())
    admission = Admission(cfg.policies, metrics.registry, datastore.snapshot, debug_headers=cfg.server.debug_headers,
                          on_rate_limited=metrics.rate_limited)
    core_ref: list[Core] = []

    def client() -> Client:
        return core_ref[0].redis_client()

    def pipe() -> object:
        handle = core_ref[0].redis
        return handle.pipe if handle is not None else None

    store = traced_store_class(tracing)(client, cfg.state, pipe)  # type: ignore[arg-type]
    sessions = SessionAffinity(datastore, store)
    shared_cfg = cfg.state.shared_inflight
    shared = None
    if shared_cfg.enabled or (shared_cfg.enabled is None and cfg.state.redis_url):
        shared = SharedInflight(datastore, shared_cfg, metrics.registry, pipe, client,  # type: ignore[arg-type]
                                pending=kv_state.pending if kv_state is not None else None)
    pipeline = Pipeline(admission, sessions, scheduler, datastore, metrics, res,
                        session_from_user=cfg.routing.session_from_user, circuits=circuits, tracing=tracing,
                        access=access, shared_inflight=shared)
    if transport is None:
        transport = RawTransport(upstream) if upstream.client == "raw" else AiohttpTransport(upstream)
    dispatcher = Dispatcher(transport, targets, datastore, scheduler, circuits, budget, res, metrics, outcomes,
                            debug_headers=cfg.server.debug_headers, picked=pipeline.picked,
                            reroute=pipeline.reroute, settle=pipeline.settle,
                            on_refused=prober.refused, tracing=tracing)
    core = Core(cfg=cfg, metrics=metrics, outcomes=outcomes, access=access, datastore=datastore, targets=targets,
                scheduler=scheduler, upstream=upstream, admission=admission, store=store, sessions=sessions,
                pipeline=pipeline, dispatcher=dispatcher, circuits=circuits, collector=collector, prober=prober,
                drain=Drain(res.drain), trusted_proxies=TrustedProxies(cfg.server.trusted_proxies),
                kv_state=kv_state, kv_subscriber=kv_subscriber, tracing=tracing, shared_inflight=shared)
    core_ref.append(core)
    return core
