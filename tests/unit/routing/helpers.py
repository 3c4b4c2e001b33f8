"""Builders shared by the routing unit tests: a fake clock and a datastore with named endpoints."""
from __future__ import annotations

from collections.abc import Iterable

from routing.datastore import Datastore
from routing.types import EndpointMetrics, EndpointSpec


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
