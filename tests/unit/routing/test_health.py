"""The /health prober through its seam: an injected fetch plays the backends (no sockets)."""
from __future__ import annotations

import asyncio

from routing.datastore import Datastore
from routing.health import HealthProber
from routing.types import EndpointMetrics, EndpointSpec


class Backends:
    """Each endpoint answers a status, refuses, or hangs; every probe is recorded."""

    def __init__(self) -> None:
        self.answer: dict[str, int | str] = {}
        self.probed: list[str] = []

    async def fetch(self, url: str) -> tuple[int, str]:
        name = url.split("//")[1].split(".")[0]
        self.probed.append(name)
        answer = self.answer.get(name, 200)
        if answer == "refused":
            raise ConnectionRefusedError(111, "Connection refused")
        if answer == "hang":
            await asyncio.sleep(3600)
        assert isinstance(answer, int)
        return answer, ""


def _setup() -> tuple[Datastore, HealthProber, Backends, list[float], list[str]]:
    now = [0.0]
    ds = Datastore(lambda: now[0], stale_after_s=2.0)
    for n in ("a", "b"):
        ds.upsert(EndpointSpec(name=n, url=f"http://{n}.test", models=frozenset({"m"})))
        ds.update_metrics(n, EndpointMetrics())
    restarted: list[str] = []
    ds.add_restart_listener(restarted.append)
    backends = Backends()
    prober = HealthProber(ds, backends.fetch, {n: f"http://{n}.test/health" for n in ("a", "b")},
                          timeout_s=0.05, unhealthy_after=2, clock=lambda: now[0])
    return ds, prober, backends, now, restarted


def _healthy(ds: Datastore, name: str) -> bool:
    return ds.snapshot().endpoints[name].healthy


async def test_only_endpoints_in_doubt_are_probed() -> None:
    ds, prober, backends, now, _ = _setup()
    await prober.probe_once()
    assert backends.probed == [], "fresh, healthy, closed endpoints cost no probe"
    ds.set_circuit_open("a", True)
    await prober.probe_once()
    assert backends.probed == ["a"]
    now[0] = 5.0  # metrics stale for both
    backends.probed.clear()
    await prober.probe_once()
    assert sorted(backends.probed) == ["a", "b"]


async def test_a_refused_probe_takes_it_out_at_once_failures_after_a_streak() -> None:
    ds, prober, backends, now, _ = _setup()
    now[0] = 5.0
    backends.answer = {"a": "refused", "b": 503}
    await prober.probe_once()
    assert not _healthy(ds, "a") and _healthy(ds, "b"), "one failed probe is not yet a verdict"
    await prober.probe_once()
    assert not _healthy(ds, "b")
    backends.answer["b"] = "hang"  # a probe that times out counts as a failure too
    await prober.probe_once()
    assert not _healthy(ds, "b")


async def test_an_endpoint_that_refused_and_answers_again_counts_as_restarted() -> None:
    ds, prober, backends, now, restarted = _setup()
    now[0] = 5.0
    backends.answer = {"a": "refused", "b": 503}
    await prober.probe_once()
    await prober.probe_once()
    backends.answer = {}
    await prober.probe_once()
    assert _healthy(ds, "a") and _healthy(ds, "b")
    # a refused (nothing listened: a new process, an empty cache); b only answered errors for a while.
    assert restarted == ["a"]
    assert ds.snapshot().endpoints["a"].generation == 1


async def test_a_request_that_found_nothing_listening_marks_it_for_restart_too() -> None:
    ds, prober, _, _, restarted = _setup()
    ds.set_healthy("a", False, "connect refused")
    prober.refused("a")
    await prober.probe_once()
    assert _healthy(ds, "a") and restarted == ["a"]
