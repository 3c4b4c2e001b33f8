"""The gateway's long-lived parts, built from config and started/stopped by the app lifespan.

No globals: handlers reach this object through `request.app.state.gateway`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from starlette.routing import BaseRoute

from gateway.admission import install_admission
from gateway.config import GatewayConfig
from gateway.exchange import Exchange, FinishHook, IdentifyHook, Lifecycle, PreDispatchHook
from gateway.logs import OutcomeLog
from gateway.metrics import GatewayMetrics
from gateway.redis_conn import RedisHandle, open_redis
from gateway.state import install_state
from gateway.upstream import BackendTarget, TrustedProxies, Upstream
from routing.datastore import Datastore
from routing.scheduler import Scheduler, build_scheduler
from routing.scraper import Collector
from routing.types import EndpointSpec

log = logging.getLogger("gravity")


async def _default_tenant(headers: Mapping[str, str]) -> str:
    return "default"


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.metrics = GatewayMetrics()
        self.outcomes = OutcomeLog(log)
        """Expected failures (outages, refusals): one WARNING per kind per interval, no traceback."""
        self.upstream = Upstream(cfg.server)
        self.trusted_proxies = TrustedProxies(cfg.server.trusted_proxies)
        self.datastore = Datastore(stale_after_s=cfg.routing.stale_after_s)
        self.targets: dict[str, BackendTarget] = {}
        for b in cfg.backends:
            target = BackendTarget.from_config(b)
            self.targets[b.name] = target
            self.datastore.upsert(EndpointSpec(
                name=b.name, url=b.url, models=frozenset(b.models) if b.models else None,
                models_url=target.models_url, metrics_url=target.metrics_url,
                scrape_metrics=target.metrics_url is not None,
            ))
        self.scheduler: Scheduler = build_scheduler(cfg.routing, self.datastore)
        self.collector = Collector(self.datastore, self._fetch, interval_s=cfg.routing.scrape_interval_s,
                                   timeout_s=cfg.routing.scrape_timeout_s,
                                   unhealthy_after=cfg.routing.unhealthy_after_failures)
        self.redis: RedisHandle | None = None
        # Extension points for the admission and state layers (each registers itself in install()).
        self.pre_dispatch_hooks: list[PreDispatchHook] = []
        """Run in order before scheduling; may raise (a policy error) or refine `ex.routing`."""
        self.picked_hooks: list[FinishHook] = []
        """Run once a backend accepted the request (e.g. remember the session's endpoint)."""
        self.finish_hooks: list[FinishHook] = []
        """Run after the response ended, whatever the outcome (settle budgets, record usage)."""
        self.identify: IdentifyHook = _default_tenant
        """The caller's tenant from request headers, for routes that do not dispatch (stored objects);
        the admission layer replaces it with API-key authentication (raising 401/403)."""
        self.extra_routes: list[BaseRoute] = []
        self.lifecycle: list[Lifecycle] = []
        """Objects with async start()/stop(), started after Redis and stopped before it."""
        self._tasks: list[asyncio.Task[None]] = []
        install_admission(self)
        self.state = install_state(self)  # after admission: session keys need the admitted tenant

    async def _fetch(self, url: str) -> tuple[int, str]:
        return await self.upstream.fetch_text(url, self.cfg.routing.scrape_timeout_s)

    async def start(self) -> None:
        await self.upstream.open()
        self.redis = open_redis(self.cfg.state)
        # One scrape before serving, so /ready and routing start from real state.
        with contextlib.suppress(Exception):
            await self.collector.refresh_once()
        self._tasks.append(asyncio.create_task(self.collector.run(), name="gravity-collector"))
        for part in self.lifecycle:
            await part.start()

    async def stop(self) -> None:
        for part in reversed(self.lifecycle):
            with contextlib.suppress(Exception):
                await part.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.close()
            self.redis = None

    def configured_models(self) -> set[str]:
        return {m for b in self.cfg.backends for m in (b.models or ())}

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every configured (or discovered) model has a healthy backend."""
        served = self.datastore.served_models()
        wanted = self.configured_models() or {m for e in self.datastore.snapshot() for m in (e.models or ())}
        missing = sorted(wanted - served)
        return (bool(served) and not missing), missing

    async def before_dispatch(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        for hook in self.pre_dispatch_hooks:
            await hook(ex, headers)

    async def picked(self, ex: Exchange) -> None:
        for hook in self.picked_hooks:
            try:
                await hook(ex)
            except Exception:
                log.exception("picked hook %r failed for request %s", hook, ex.request_id)

    async def finish(self, ex: Exchange) -> None:
        """Account for a finished exchange: in-flight counts, metrics, then other layers' hooks."""
        ex.finished_at = time.perf_counter()
        ticket = ex.extras.pop("inflight_ticket", None)
        if ticket is not None:
            self.datastore.end(ticket)
        self.metrics.observe(ex)
        for hook in self.finish_hooks:
            try:
                await hook(ex)
            except Exception:
                log.exception("finish hook %r failed for request %s", hook, ex.request_id)
