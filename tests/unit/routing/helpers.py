"""Builders shared by the routing unit tests: a fake clock and a datastore with named endpoints."""
from __future__ import annotations

import random
from collections.abc import Iterable

from routing.datastore import Datastore
from routing.plugins.base import CycleContext
from routing.types import EndpointMetrics, EndpointSpec, EndpointView, RoutingRequest, Snapshot


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_datastore(
    names: Iterable[str] = ("a", "b", "c"), model: str = "m", clock: FakeClock | None = None
) -> Datastore:
    ds = Datastore(clock or FakeClock())
    for name in names:
        ds.upsert(EndpointSpec(name=name, url=f"http://{name}", models=frozenset({model})))
    return ds


def metrics(**kw: object) -> EndpointMetrics:
    return EndpointMetrics(**kw)  # type: ignore[arg-type]


def view(name: str = "a", **kw: object) -> EndpointView:
    """An EndpointView with sensible defaults, for table-driven plugin tests."""
    base: dict[str, object] = {
        "name": name, "url": f"http://{name}", "models": frozenset({"m"}), "loras": frozenset(), "healthy": True,
        "health_reason": "", "circuit_open": False, "metrics": None, "fresh": False, "inflight_requests": 0,
        "inflight_prompt_tokens": 0, "inflight_decode_tokens": 0, "generation": 0,
    }
    base.update(kw)
    return EndpointView(**base)  # type: ignore[arg-type]


def context(*views: EndpointView, rng_seed: int = 0, **req: object) -> CycleContext:
    request = RoutingRequest(model=str(req.pop("model", "m")), prompt=bytes(req.pop("prompt", b"p")), **req)  # type: ignore[arg-type]
    snap = Snapshot(endpoints={v.name: v for v in views}, taken_at=0.0)
    return CycleContext(request=request, snapshot=snap, rng=random.Random(rng_seed))
