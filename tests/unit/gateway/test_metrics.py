"""The gateway's metric store: Prometheus semantics (cumulative `le` buckets, counters), a series cap,
and what `decided_by` names as the reason for a pick."""
from __future__ import annotations

import math

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.core import build_core
from gateway.exchange import Exchange
from gateway.metrics import KEY_NONE, KEY_OTHER, MAX_SERIES, OVERFLOW, GatewayMetrics, decided_by
from gateway.openai_requests import parse_body
from routing.types import Candidate, Decision


def _samples(m: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_histogram_buckets_are_cumulative_and_a_bound_belongs_to_its_bucket() -> None:
    m = GatewayMetrics()
    for v in (0.0, 0.1, 0.1, 0.5, 3.0):
        m.prefix_ratio.labels("default").observe(v)
    got = _samples(m)

    def bucket(le: str) -> float:
        return got[("gravity_prefix_match_ratio_bucket", frozenset({("profile", "default"), ("le", le)}))]

    assert [bucket(le) for le in ("0.0", "0.1", "0.25", "0.5", "1.0", "+Inf")] == [1, 3, 3, 4, 4, 5]
    assert got[("gravity_prefix_match_ratio_count", frozenset({("profile", "default")}))] == 5
    assert math.isclose(got[("gravity_prefix_match_ratio_sum", frozenset({("profile", "default")}))], 3.7)


def test_counters_render_with_total_and_gauges_as_set() -> None:
    m = GatewayMetrics()
    m.requests.labels("embeddings", "m", "b", "200").inc()
    m.requests.labels("embeddings", "m", "b", "200").inc(2)
    m.circuit_changed("b", "open")
    m.inflight.inc()
    got = _samples(m)
    labels = frozenset({("route", "embeddings"), ("model", "m"), ("backend", "b"), ("status", "200")})
    assert got[("gravity_requests_total", labels)] == 3
    assert got[("gravity_circuit_state", frozenset({("backend", "b"), ("state", "open")}))] == 1
    assert got[("gravity_circuit_state", frozenset({("backend", "b"), ("state", "closed")}))] == 0
    assert got[("gravity_circuit_transitions_total", frozenset({("backend", "b"), ("state", "open")}))] == 1
    assert got[("gravity_requests_in_flight", frozenset())] == 1


def test_series_past_the_cap_fold_into_one_overflow_series() -> None:
    m = GatewayMetrics()
    for i in range(MAX_SERIES + 50):
        m.routing_errors.labels(f"model-{i}", "no_healthy_backend").inc()
    got = [k for k in _samples(m) if k[0] == "gravity_routing_errors_total"]
    assert len(got) == MAX_SERIES + 1
    overflow = ("gravity_routing_errors_total", frozenset({("model", OVERFLOW), ("code", OVERFLOW)}))
    assert _samples(m)[overflow] == 50


def test_wrong_label_count_is_a_bug_not_a_series() -> None:
    with pytest.raises(ValueError):
        GatewayMetrics().requests.labels("only-one")


def _decision(rows: dict[str, dict[str, float]], weights: dict[str, float], order: list[str]) -> Decision:
    ranked = []
    for name in order:
        scores = rows[name]
        total = sum(weights[k] * v for k, v in scores.items() if v)
        ranked.append(Candidate(name, f"http://{name}", total, dict(scores)))
    return Decision(model="m", profile="p", ranked=ranked, weights=tuple(weights.items()))


W = {"prefix": 3.0, "load": 1.0}


@pytest.mark.parametrize(("rows", "weights", "order", "want"), [
    ({"a": {"prefix": 1.0, "load": 0.2}, "b": {"prefix": 0.0, "load": 0.9}}, W, ["a", "b"], "prefix"),
    ({"a": {"prefix": 0.5, "load": 0.9}, "b": {"prefix": 0.5, "load": 0.1}}, W, ["a", "b"], "load"),
    # prefix leads by 0.2 * 3 = 0.6, load by 0.5 * 1: the larger weighted lead decides
    ({"a": {"prefix": 0.4, "load": 0.6}, "b": {"prefix": 0.2, "load": 0.1}}, W, ["a", "b"], "prefix"),
    ({"a": {"prefix": 0.5, "load": 0.5}, "b": {"prefix": 0.5, "load": 0.5}}, W, ["a", "b"], "tie"),
    ({"a": {"prefix": 0.0, "load": 0.1}, "b": {"prefix": 1.0, "load": 0.9}}, W, ["a", "b"], "picker"),
    ({"a": {"session": 1.0, "load": 0.0}, "b": {"session": 0.0, "load": 1.0}},
     {"session": math.inf, "load": 1.0}, ["a", "b"], "session"),
    ({"a": {"prefix": 1.0, "load": 1.0}}, W, ["a"], "only_candidate"),
])
def test_decided_by_names_the_scorer_with_the_largest_weighted_lead(
        rows: dict[str, dict[str, float]], weights: dict[str, float], order: list[str], want: str) -> None:
    assert decided_by(_decision(rows, weights, order)) == want


def test_decided_by_without_weights_or_candidates() -> None:
    assert decided_by(Decision(model="m", profile="p", ranked=[])) == "none"
    d = Decision(model="m", profile="p", ranked=[Candidate("a", "u", 2.0, {}), Candidate("b", "u", 1.0, {})])
    assert decided_by(d) == "score"


def _finished(m: GatewayMetrics, ex: Exchange, key_name: str | None) -> None:
    ex.key_name, ex.status, ex.backend, ex.outcome = key_name, 200, "b", "ok"
    ex.usage = {"prompt_tokens": 3, "completion_tokens": 2}
    m.observe(ex)


def _exchange() -> Exchange:
    core = build_core(parse_config({"backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["m"]}]}))
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return core.pipeline.exchange("chat/completions", parse_body("chat/completions", raw), raw, {}, "rid", {})


def test_key_names_past_the_cap_share_the_label_other() -> None:
    m = GatewayMetrics(key_label_max=100)
    ex = _exchange()
    for i in range(500):
        _finished(m, ex, f"key-{i}")
    _finished(m, ex, None)  # no key accepted
    got = _samples(m)
    keys = {dict(ls)["key"] for n, ls in got if n == "gravity_key_requests_total"}
    assert keys == {f"key-{i}" for i in range(100)} | {KEY_OTHER, KEY_NONE}
    assert got[("gravity_key_requests_total", frozenset(
        {("tenant", "default"), ("key", KEY_OTHER), ("status", "200")}))] == 400
    tokens = {dict(ls)["key"] for n, ls in got if n == "gravity_tokens_total"}
    assert tokens == keys
    assert len(m._key_labels or {}) == 100  # the names past the cap are not even remembered


def test_without_the_option_no_series_has_a_key_label() -> None:
    m = GatewayMetrics()
    _finished(m, _exchange(), "key-0")
    got = _samples(m)
    assert not [n for n, ls in got if "key" in dict(ls)]
    assert not [n for n, _ in got if n.startswith("gravity_key_requests")]
    assert got[("gravity_tokens_total", frozenset({("tenant", "default"), ("model", "m"), ("type", "input")}))] == 3
