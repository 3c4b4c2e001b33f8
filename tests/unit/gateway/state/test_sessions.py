from __future__ import annotations

from typing import Any

from gateway.state.sessions import SessionAffinity
from routing.datastore import Datastore
from routing.types import EndpointMetrics, EndpointSpec


class _Gw:
    def __init__(self) -> None:
        self.datastore = Datastore(clock=lambda: 0.0)
        self.datastore.upsert(EndpointSpec(name="a", url="http://a"))
        self.datastore.update_metrics("a", EndpointMetrics(process_start_time=100.0))


def _affinity() -> tuple[SessionAffinity, Any]:
    gw = _Gw()
    return SessionAffinity(gw.datastore, store=None), gw  # type: ignore[arg-type]


def test_remembered_endpoint_is_kept_while_it_runs() -> None:
    aff, _ = _affinity()
    assert aff.still_valid(aff.record("a")) == "a"


def test_affinity_dropped_when_the_endpoint_restarted_or_was_removed() -> None:
    aff, gw = _affinity()
    rec = aff.record("a")
    gw.datastore.update_metrics("a", EndpointMetrics(process_start_time=200.0))
    assert aff.still_valid(rec) is None  # another process start: its cache is gone
    rec = aff.record("a")
    gw.datastore.on_restart("a")  # detected from counters going backwards
    assert aff.still_valid(rec) is None
    rec = aff.record("a")
    gw.datastore.remove("a")
    assert aff.still_valid(rec) is None
    assert aff.still_valid(b"not json") is None


def test_another_replica_trusts_process_start_time_not_its_generation() -> None:
    aff, gw = _affinity()
    other, _ = _affinity()
    other.datastore = gw.datastore
    gw.datastore.on_restart("a")
    rec = other.record("a")
    assert aff.still_valid(rec) == "a"
