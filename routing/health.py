"""Active health: `/health` probes for endpoints that are down, whose circuit is open, or whose metrics
went stale, so routing does not hinge on `/metrics` alone.

Stale metrics mean "load unknown", not "dead": a slow scrape no longer takes an endpoint out; a
failed probe does (`unhealthy_after` in a row, or a refused connection at once). An endpoint that
comes back after refusing connections was restarted, so its cache is empty: the datastore is told
(prefix-index entries and session affinities for it are dropped). Takes an injected
``fetch(url) -> (status, text)`` like the collector, so it carries no HTTP client types.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from routing.datastore import Datastore
from routing.scraper import is_connection_refused
from routing.types import EndpointSpec

__all__ = ["HealthProber"]

Fetch = Callable[[str], Awaitable[tuple[int, str]]]


class HealthProber:
    def __init__(self, datastore: Datastore, fetch: Fetch, health_urls: dict[str, str], *, interval_s: float = 1.0,
                 timeout_s: float = 1.0, unhealthy_after: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ds = datastore
        self._fetch = fetch
        self._urls = health_urls
        """Endpoint name -> its health URL (endpoints without one are judged passively only)."""
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._unhealthy_after = unhealthy_after
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._refused: set[str] = set()
        self.probes = 0

    def _due(self, spec: EndpointSpec) -> bool:
        view = self._ds.snapshot().endpoints.get(spec.name)
        if view is None or spec.name not in self._urls:
            return False
        return not view.healthy or view.circuit_open or not view.fresh

    async def probe_once(self) -> None:
        await asyncio.gather(*(self._probe(spec.name) for spec in self._ds.specs() if self._due(spec)))

    async def run(self) -> None:
        while True:
            started = self._clock()
            with contextlib.suppress(Exception):
                await self.probe_once()
            await asyncio.sleep(max(0.0, self._interval_s - (self._clock() - started)))

    async def _probe(self, name: str) -> None:
        self.probes += 1
        try:
            status, _ = await asyncio.wait_for(self._fetch(self._urls[name]), self._timeout_s)
            ok, refused = status == 200, False
            reason = f"health probe: HTTP {status}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to probe counts against health
            ok, refused = False, is_connection_refused(exc)
            reason = f"health probe failed: {type(exc).__name__}"
        if ok:
            self._failures.pop(name, None)
            if name in self._refused:
                # It refused connections and now answers: a new process with an empty cache.
                self._refused.discard(name)
                self._ds.on_restart(name)
            self._ds.set_healthy(name, True)
            return
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        if refused:
            self._refused.add(name)
        if refused or count >= self._unhealthy_after:
            self._ds.set_healthy(name, False, reason)

    def refused(self, name: str) -> None:
        """A request found nothing listening at `name`: its next good probe means it restarted."""
        self._refused.add(name)
