"""The evaluator's KV-event feed: precise routing tracks the oracle, loss is replayed or resynced."""
from __future__ import annotations

from typing import Any

from routing.eval.cluster import simulate
from routing.eval.kv_feed import KVFeedOptions
from routing.eval.metrics import summarize
from routing.eval.policies import policy_config
from routing.eval.workloads import WorkloadOptions, generate
from simulator.profiles import get_profile

ENGINE = get_profile("h100-8b", kv_blocks=1500)


def _records() -> list[Any]:
    return generate("shared-prefix", WorkloadOptions(seed=1, requests=240, rate=8.0))


def _run(policy: str, feed: KVFeedOptions | None = None, replicas: int = 1) -> tuple[dict[str, Any], Any]:
    result = simulate(_records(), config=lambda reg: policy_config(policy, reg), engine=ENGINE, backends=4,
                      seed=1, policy_name=policy, kv_feed=feed, replicas=replicas)
    return summarize(result), result.kv_events


def test_precise_reaches_the_oracles_hit_rate() -> None:
    oracle, _ = _run("oracle")
    for policy in ("precise", "precise-engine"):
        precise, kv = _run(policy)
        assert precise["completed"] == 240
        # Within 3 %: both copy hot prefixes (hot_replication), at moments that differ with what each knows
        # (the oracle also counts prefixes queued for prefill as cached); 97.98 % here, 99.96 % without it.
        assert precise["hit_rate"] >= 0.97 * oracle["hit_rate"], (policy, precise["hit_rate"], oracle["hit_rate"])
        assert kv is not None and kv["published"] > 0 and kv["lost"] == 0
        assert sum(e["blocks_held"] for e in kv["endpoints"].values()) > 0


def test_lost_batches_are_replayed_or_resynced() -> None:
    replayed, kv = _run("precise", KVFeedOptions(loss=0.2, replay=True, seed=3))
    assert kv is not None and kv["lost"] > 0
    eps = kv["endpoints"].values()
    assert sum(e["replays"] for e in eps) > 0 and sum(e["resyncs"] for e in eps) == 0
    lossless, _ = _run("precise")
    assert replayed["hit_rate"] >= 0.98 * lossless["hit_rate"]
    resynced, kv2 = _run("precise", KVFeedOptions(loss=0.2, replay=False, seed=3))
    assert kv2 is not None and sum(e["resyncs"] for e in kv2["endpoints"].values()) > 0
    assert resynced["completed"] == 240


def test_replicas_share_events_but_not_in_flight_counts() -> None:
    one, _ = _run("precise")
    three, _ = _run("precise", replicas=3)
    assert three["completed"] == 240
    # Same events everywhere: the cluster's hit rate stays within 2 points of one gateway's, while the
    # approximate index, which learns only from its own replica's picks, loses a third of its hits.
    assert abs(three["hit_rate"] - one["hit_rate"]) < 0.02
    approx_one, _ = _run("default")
    approx_three, _ = _run("default", replicas=3)
    assert approx_three["hit_rate"] < approx_one["hit_rate"] - 0.1
