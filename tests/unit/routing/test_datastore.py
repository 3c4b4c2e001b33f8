from __future__ import annotations

import pytest

from routing.types import EndpointSpec
from tests.unit.routing.helpers import FakeClock, make_datastore, metrics


def test_inflight_accounting_is_symmetric_and_idempotent() -> None:
    ds = make_datastore()
    t1 = ds.begin("a", 100, 10)
    t2 = ds.begin("a", 50, 5)
    view = ds.snapshot().endpoints["a"]
    assert (view.inflight_requests, view.inflight_prompt_tokens, view.inflight_decode_tokens) == (2, 150, 15)
    ds.end(t1)
    ds.end(t1)
    ds.end(t2)
    view = ds.snapshot().endpoints["a"]
    assert (view.inflight_requests, view.inflight_prompt_tokens, view.inflight_decode_tokens) == (0, 0, 0)


def test_inflight_survives_remove_and_unknown_endpoints() -> None:
    ds = make_datastore()
    ticket = ds.begin("a", 1, 1)
    ds.remove("a")
    ds.upsert(EndpointSpec("a", "http://a", frozenset({"m"})))
    ds.end(ticket)
    assert ds.snapshot().endpoints["a"].inflight_requests == 0
    ds.end(ds.begin("ghost", 1, 1))


def test_snapshot_is_a_copy() -> None:
    ds = make_datastore()
    snap = ds.snapshot()
    ds.begin("a", 1, 1)
    ds.set_healthy("b", False, "down")
    assert snap.endpoints["a"].inflight_requests == 0
    assert snap.endpoints["b"].healthy


def test_staleness_follows_the_clock() -> None:
    clock = FakeClock()
    ds = make_datastore(clock=clock)
    ds.update_metrics("a", metrics(waiting=3))
    assert ds.snapshot().endpoints["a"].fresh
    clock.now += 2.5
    view = ds.snapshot().endpoints["a"]
    assert not view.fresh and view.trusted_metrics() is None
    assert ds.describe()["a"]["fresh"] is False


def test_served_models_only_counts_healthy_endpoints() -> None:
    ds = make_datastore(names=("a", "b"))
    ds.set_models("b", {"other"}, {"adapter"})
    assert ds.served_models() == {"m", "other", "adapter"}
    ds.set_healthy("b", False, "scrape failed")
    assert ds.served_models() == {"m"}
    assert ds.models_of("b") == frozenset({"other"})


def test_adapter_base_names_the_parent_only_for_adapters() -> None:
    ds = make_datastore(names=("a", "b", "c"))
    ds.upsert(EndpointSpec("d", "http://d"))
    ds.set_models("b", {"m"}, {"sql"}, {"sql": "m"})
    ds.set_models("c", {"other"}, {"chat-lora"})  # no parent given: the endpoint's only base model
    ds.set_models("d", {"m", "x"}, {"odd"})  # no parent and two bases: unknown
    assert ds.adapter_base("sql") == "m"
    assert ds.adapter_base("chat-lora") == "other"
    assert ds.adapter_base("odd") is None
    assert ds.adapter_base("m") is None and ds.adapter_base("missing") is None
    # A name some endpoint serves as a base model is a base model, whatever another lists.
    ds.set_models("c", {"other"}, {"m"}, {"m": "other"})
    assert ds.adapter_base("m") is None


def test_restart_detected_from_counters_and_start_time() -> None:
    ds = make_datastore()
    restarted: list[str] = []
    ds.add_restart_listener(restarted.append)
    ds.update_metrics("a", metrics(prefix_queries_total=100.0, process_start_time=1.0))
    ds.update_metrics("a", metrics(prefix_queries_total=150.0, process_start_time=1.0))
    assert restarted == []
    ds.update_metrics("a", metrics(prefix_queries_total=10.0, process_start_time=1.0))
    ds.update_metrics("a", metrics(prefix_queries_total=20.0, process_start_time=2.0))
    assert restarted == ["a", "a"]
    assert ds.snapshot().endpoints["a"].generation == 2
    ds.remove("a")
    assert restarted[-1] == "a"


def test_describe_is_json_ready() -> None:
    import json

    ds = make_datastore(names=("a",))
    ds.update_metrics("a", metrics(waiting=2, loras_running=frozenset({"x"})))
    ds.begin("a", 5, 6)
    body = json.loads(json.dumps(ds.describe()))
    assert body["a"]["metrics"]["waiting"] == 2
    assert body["a"]["metrics"]["loras_running"] == ["x"]
    assert body["a"]["inflight"] == {"requests": 1, "prompt_tokens": 5, "decode_tokens": 6,
                                     "other_replicas": {"requests": 0, "prompt_tokens": 0}}


def test_snapshot_is_reused_until_a_write_and_rebuilds_only_what_changed() -> None:
    ds = make_datastore()
    first = ds.snapshot()
    assert ds.snapshot() is first
    ticket = ds.begin("a", 10, 1)
    second = ds.snapshot()
    assert second is not first and second.endpoints["a"].inflight_requests == 1
    assert second.endpoints["b"] is first.endpoints["b"]  # untouched endpoints keep their view
    ds.end(ticket)
    assert ds.snapshot().endpoints["a"].inflight_requests == 0


def test_cached_snapshot_expires_when_metrics_turn_stale() -> None:
    clock = FakeClock()
    ds = make_datastore(clock=clock)
    ds.update_metrics("a", metrics(waiting=1))
    assert ds.snapshot().endpoints["a"].fresh
    clock.now += 1.0
    assert ds.snapshot().endpoints["a"].fresh
    clock.now += 1.5
    assert not ds.snapshot().endpoints["a"].fresh


def test_prefill_rate_is_measured_over_busy_periods_and_discounts_the_backlog() -> None:
    clock = FakeClock(100.0)
    ds = make_datastore(["a"], clock=clock)
    first = ds.begin("a", 1000, 16)  # busy period starts at 100.0
    clock.now = 100.1
    second = ds.begin("a", 1000, 16)
    assert ds.snapshot().endpoints["a"].pending_prefill_tokens(100.1) == 2000  # rate unknown yet: raw count
    clock.now = 100.5
    ds.first_token(first)  # 1,000 tokens done in 0.5 s
    a = ds.snapshot().endpoints["a"]
    assert a.prefill_tokens_per_s == pytest.approx(2000.0)
    # 2,000 dispatched in the period, 0.6 s at 2,000 tok/s done by 100.6: 800 of the 1,000 pending left.
    assert a.pending_prefill_tokens(100.6) == pytest.approx(800.0)
    assert a.pending_prefill_tokens(101.5) == 0.0
    assert a.pending_prefill_tokens(100.6, rate_fraction=0.0) == 1000
    ds.first_token(second)
    clock.now = 200.0
    ds.begin("a", 500, 16)  # the backlog had emptied: a new busy period starts now
    assert ds.snapshot().endpoints["a"].pending_prefill_tokens(200.0) == 500


# -- in-flight shared between gateway replicas (gateway/state/inflight.py) -----------------------------
def test_other_replicas_counts_add_to_the_view_and_only_own_ones_are_published() -> None:
    ds = make_datastore()
    changed: list[str] = []
    ds.add_inflight_listener(changed.append)
    ticket = ds.begin("a", 100, 10)
    ds.set_foreign_inflight({"a": (3, 900), "gone": (5, 5)})
    view = ds.snapshot().endpoints["a"]
    assert (view.inflight_requests, view.foreign_requests, view.foreign_prompt_tokens) == (4, 3, 900)
    assert view.pending_prefill_tokens(0.0) == 1000
    assert ds.own_inflight("a") == (1, 100), "what this replica shares excludes what it was told"
    ds.first_token(ticket)
    ds.end(ticket)
    assert changed == ["a", "a", "a"]
    ds.set_foreign_inflight({})  # Redis unreachable: own counts only
    assert ds.snapshot().endpoints["a"].inflight_requests == 0


def test_a_scrape_older_than_the_counts_is_not_someone_elses_queue() -> None:
    ds = make_datastore(clock=FakeClock())
    tickets = [ds.begin("a", 10, 1) for _ in range(3)]
    ds.update_metrics("a", metrics(waiting=3))  # the scrape saw the three
    ds.update_metrics("a", metrics(waiting=3))
    for t in tickets:
        ds.end(t)  # they finished after it
    assert ds.snapshot().endpoints["a"].unaccounted_waiting() == 0
    ds.update_metrics("a", metrics(waiting=2))  # two the gateways never dispatched
    ds.update_metrics("a", metrics(waiting=2))
    assert ds.snapshot().endpoints["a"].unaccounted_waiting() == 2
