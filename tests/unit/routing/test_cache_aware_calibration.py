"""The cache-aware baseline's calibration parameters: defaults keep SGLang's behaviour, and
`low_match: least-load` follows vllm-router 0.1.17, which sends a prefix miss to the worker with
the fewest in-flight requests (measured against the binary: docs/benchmarks.md)."""
from __future__ import annotations

from routing.config import RoutingConfig
from routing.plugins.cache_aware import CacheAwareParams, CacheAwarePicker
from routing.types import Candidate
from tests.unit.routing.helpers import context, view


def _pick(picker: CacheAwarePicker, views: list, prompt: bytes) -> str:  # type: ignore[type-arg]
    ctx = context(*views, prompt=prompt)
    chosen = picker.pick(ctx, [Candidate(v.name, v.url, 0.0) for v in views])[0].endpoint
    picker.observe(ctx.request, chosen)
    return chosen


def _grown_tree_on_b(picker: CacheAwarePicker) -> None:
    """Worker b holds a large tree, a holds nothing."""
    assert _pick(picker, [view("b")], b"B" * 4000) == "b"


def test_default_sends_a_miss_to_the_smallest_tree_whatever_the_load() -> None:
    picker = CacheAwarePicker("ca", CacheAwareParams())
    assert CacheAwareParams().low_match == "smallest-tree"
    _grown_tree_on_b(picker)
    # b has the tree, a has 5 in flight (below the balance thresholds): SGLang picks the empty tree.
    assert _pick(picker, [view("a", inflight_requests=5), view("b")], b"Z" * 400) == "a"


def test_least_load_sends_a_miss_to_the_least_loaded_worker_whatever_its_tree() -> None:
    picker = CacheAwarePicker("ca", CacheAwareParams(low_match="least-load"))
    _grown_tree_on_b(picker)
    assert _pick(picker, [view("a", inflight_requests=5), view("b")], b"Z" * 400) == "b"
    # A match above the cache threshold still follows the cache, load or not.
    assert _pick(picker, [view("a"), view("b", inflight_requests=5)], b"B" * 4000 + b"q") == "b"


def test_the_parameter_is_set_from_routing_config() -> None:
    cfg = RoutingConfig.model_validate({
        "plugins": [{"type": "cache-aware", "name": "ca", "params": {"low_match": "least-load"}}],
        "profiles": [{"name": "vllm-router", "picker": "ca"}],
    })
    spec = next(p for p in cfg.plugins if p.key == "ca")
    assert spec.params["low_match"] == "least-load"
