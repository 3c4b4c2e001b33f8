"""Pipeline.route with the real scheduler, datastore and circuit breakers (no Redis: routing needs none)."""
from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from gateway.admission import Admission
from gateway.config import StateConfig
from gateway.exchange import Exchange
from gateway.metrics import GatewayMetrics
from gateway.openai_requests import parse_body
from gateway.pipeline import Pipeline
from gateway.state import SessionAffinity, StateStore
from policies.circuit import OPEN, CircuitBoard, CircuitPolicy
from policies.config import PoliciesConfig
from policies.resilience import ResilienceConfig
from routing.config import RoutingConfig
from routing.datastore import Datastore
from routing.scheduler import build_scheduler
from routing.types import EndpointSpec, RoutingRequest


def _pipeline() -> tuple[Pipeline, CircuitBoard, list[float]]:
    ds = Datastore()
    for n in ("a", "b"):
        ds.upsert(EndpointSpec(name=n, url=f"http://{n}.test", models=frozenset({"m"})))
    now = [0.0]
    circuits = CircuitBoard(CircuitPolicy(consecutive_failures=1, open_s=2.0), lambda: now[0],
                            lambda e, s: ds.set_circuit_open(e, s == OPEN))
    store = StateStore(lambda: None, StateConfig())  # type: ignore[arg-type,return-value]
    admission = Admission(PoliciesConfig(), CollectorRegistry(), ds.snapshot, debug_headers=False)
    pipeline = Pipeline(admission, SessionAffinity(ds, store), build_scheduler(RoutingConfig(), ds), ds,
                        GatewayMetrics(), ResilienceConfig(), session_from_user=False, circuits=circuits)
    return pipeline, circuits, now


def _exchange() -> Exchange:
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    parsed = parse_body("chat/completions", raw)
    return Exchange(request_id="r", route="chat/completions", model="m", body=parsed.body, raw=raw, stream=False,
                    client_wants_usage=False, routing=RoutingRequest(model="m", prompt=b"hi"), forward_headers={})


def _ranked(p: Pipeline) -> list[str]:
    ex = _exchange()
    p.route(ex)
    assert ex.decision is not None
    return sorted(c.endpoint for c in ex.decision.ranked)


def test_an_open_circuit_is_offered_to_routing_again_once_its_back_off_is_over() -> None:
    p, circuits, now = _pipeline()
    circuits.failure("a")
    assert _ranked(p) == ["b"], "an open circuit takes no traffic"
    now[0] = 1.9
    assert _ranked(p) == ["b"]
    now[0] = 2.0  # nobody asked the circuit in between: route() itself must notice the time
    assert _ranked(p) == ["a", "b"]
    assert circuits.allow("a") and not circuits.allow("a"), "offered as one half-open probe"
