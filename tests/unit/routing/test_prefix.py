from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from routing.config import RoutingConfig
from routing.prefix import ApproxPrefixIndex, block_hashes
from routing.scheduler import build_scheduler
from routing.types import RoutingRequest
from tests.unit.routing.helpers import make_datastore, metrics

SYSTEM = b"You are a helpful assistant. " * 40


def _req(prompt: bytes, **kw: object) -> RoutingRequest:
    return RoutingRequest(model=str(kw.pop("model", "m")), prompt=prompt, **kw)  # type: ignore[arg-type]


def test_hashes_chain_so_a_shared_suffix_does_not_match() -> None:
    a = block_hashes(b"A" * 64 + b"B" * 64, 64, b"s", 10)
    b = block_hashes(b"C" * 64 + b"B" * 64, 64, b"s", 10)
    assert len(a) == 2 and a[1] != b[1]
    assert block_hashes(b"x" * 100, 64, b"s", 10) == block_hashes(b"x" * 127, 64, b"s", 10)
    assert block_hashes(b"x" * 640, 64, b"s", 3) == block_hashes(b"x" * 640, 64, b"s", 10)[:3]


@given(st.binary(min_size=0, max_size=600), st.binary(min_size=0, max_size=600))
def test_match_is_the_common_block_prefix(p: bytes, q: bytes) -> None:
    index = ApproxPrefixIndex(32, 64, lambda _e: 1000)
    req_p, req_q = _req(p), _req(q)
    index.observe(req_p, "a")
    common = 0
    while common < min(len(p), len(q)) and p[common] == q[common]:
        common += 1
    hashes_q = index.hashes(req_q)
    expected = min(common // 32, len(hashes_q))
    assert index.matched_blocks(hashes_q).get("a", 0) == expected


def test_seed_separates_models_salts_and_adapters() -> None:
    index = ApproxPrefixIndex(32, 64, lambda _e: 1000)
    index.observe(_req(SYSTEM), "a")
    assert index.match(_req(SYSTEM), ["a"]) == [1.0]
    assert index.match(_req(SYSTEM, model="other"), ["a"]) == [0.0]
    assert index.match(_req(SYSTEM, cache_salt="tenant-2"), ["a"]) == [0.0]
    assert index.match(_req(SYSTEM, lora="x"), ["a"]) == [0.0]


def test_lru_is_bounded_and_evicts_oldest() -> None:
    index = ApproxPrefixIndex(32, 64, lambda _e: 4)
    first = _req(b"1" * 128)
    index.observe(first, "a")
    index.observe(_req(b"2" * 128), "a")
    assert index.size("a") == 4
    assert index.match(_req(b"1" * 128), ["a"]) == [0.0]
    assert index.match(_req(b"2" * 128), ["a"]) == [1.0]


def test_tail_first_eviction_keeps_a_prefix_head_as_the_engine_does() -> None:
    # A document of 4 blocks, then one new block: the engine (vLLM, the simulator) evicts the document's
    # last block, so 3 of its 4 blocks are still hits. An index that forgets the first block instead
    # believes the whole document gone and sends its next request elsewhere, to be computed again.
    doc = _req(b"d" * 128)
    for tail_first, expected in ((True, 0.75), (False, 0.0)):
        index = ApproxPrefixIndex(32, 64, lambda _e: 4, tail_first=tail_first)
        index.observe(doc, "a")
        index.observe(_req(b"q" * 32), "a")
        assert index.size("a") == 4
        assert index.match(_req(b"d" * 128), ["a"]) == [expected]


def test_partial_and_multi_endpoint_match() -> None:
    index = ApproxPrefixIndex(32, 64, lambda _e: 1000)
    index.observe(_req(b"x" * 64), "a")
    index.observe(_req(b"x" * 128), "b")
    assert index.match(_req(b"x" * 128), ["a", "b", "c"]) == [0.5, 1.0, 0.0]
    index.drop("b")
    assert index.match(_req(b"x" * 128), ["a", "b"]) == [0.5, 0.0]


def _prefix_cfg() -> RoutingConfig:
    return RoutingConfig.model_validate(
        {
            "plugins": [{"type": "prefix-cache-scorer", "name": "prefix", "params": {"block_size": 64}}],
            "profiles": [{"name": "p", "plugins": [{"ref": "prefix"}]}],
        }
    )


def test_scheduler_observe_teaches_affinity_and_restart_forgets() -> None:
    ds = make_datastore()
    sched = build_scheduler(_prefix_cfg(), ds, rng=random.Random(0))
    req = _req(SYSTEM + b"question one")
    first = sched.schedule(req).best.endpoint
    sched.observe(req, first)
    again = sched.schedule(_req(SYSTEM + b"question two"))
    assert again.best.endpoint == first and again.best.scores["prefix"] > 0.9
    ds.update_metrics(first, metrics(requests_total=10.0))
    ds.update_metrics(first, metrics(requests_total=1.0))  # counter went backwards: restarted
    assert sched.schedule(_req(SYSTEM + b"question three")).best.scores["prefix"] == 0.0


def test_capacity_follows_scraped_kv_size() -> None:
    ds = make_datastore(names=("a",))
    ds.update_metrics("a", metrics(kv_capacity_tokens=64))  # 64 tokens * 4 bytes / 64-byte blocks = 4 blocks
    sched = build_scheduler(_prefix_cfg(), ds, rng=random.Random(0))
    sched.observe(_req(b"y" * 640), "a")
    scorer = next(iter(sched._profiles["p"].scorers))[0]
    assert scorer.index.size("a") == 4  # type: ignore[attr-defined]


def test_home_key_is_stable_across_processes() -> None:
    # The rendezvous home must agree between gateway replicas, so it may not use the salted hash().
    from routing.prefix import stable_block_key

    assert stable_block_key(b"x" * 300, 256, b"m\x00\x00") == 13374430946111759031
    assert stable_block_key(b"x" * 255, 256, b"m\x00\x00") is None


def test_matched_blocks_tracks_holders_that_change_along_the_chain() -> None:
    index = ApproxPrefixIndex(32, 64, lambda _e: 1000)
    long, short = _req(b"L" * 320), _req(b"L" * 128)
    index.observe(long, "a")
    index.observe(short, "b")
    index.observe(long, "c")
    assert index.matched_blocks(index.hashes(long)) == {"a": 10, "c": 10, "b": 4}
    index.drop("a")
    assert index.matched_blocks(index.hashes(long)) == {"c": 10, "b": 4}
