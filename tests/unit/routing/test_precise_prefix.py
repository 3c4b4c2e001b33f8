"""The precise prefix scorer: event-fed matches, approximate fallback per endpoint, pending picks, cold
endpoints, restarts, and building it from config."""
from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from routing.config import RoutingConfig
from routing.kv.keys import RequestKeyer
from routing.kv.state import KVEventState
from routing.kv.wire import Batch, Removed, Stored, decode_batch
from routing.plugins.precise_prefix import PreciseIndex
from routing.prefix import ApproxPrefixIndex
from routing.scheduler import build_scheduler
from routing.types import RoutingRequest
from simulator.kv_events import KVEventRecorder, structs
from tests.unit.routing.helpers import FakeClock, make_datastore


class ListTokenizer:
    """The request's token ids come with it (the evaluator's case): body["ids"]."""

    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        return None if req.body is None else list(req.body["ids"])


def _req(ids: list[int], prompt: bytes = b"x" * 600) -> RoutingRequest:
    return RoutingRequest(model="m", prompt=prompt, route="completions", body={"ids": ids}, prompt_tokens=len(ids))


def _stored_for(ids: list[int], n_blocks: int) -> Stored:
    return Stored(list(range(1, n_blocks + 1)), None, ids[:16 * n_blocks], 16)


def _index(clock: FakeClock, cold_s: float = 10.0) -> tuple[PreciseIndex, KVEventState, ApproxPrefixIndex]:
    state = KVEventState("tokens", cold_s=cold_s, clock=clock)
    approx = ApproxPrefixIndex(64, 64, lambda e: 1000)
    idx = PreciseIndex(state, RequestKeyer(ListTokenizer(), "tokens"), approx, pending_ttl_s=5.0, clock=clock)
    return idx, state, approx


IDS = list(range(100, 100 + 160))  # ten blocks of 16


def test_fed_endpoints_score_what_they_hold_others_fall_back_to_the_approximate_index() -> None:
    clock = FakeClock()
    idx, state, approx = _index(clock)
    state.apply("a", Batch(0.0, [_stored_for(IDS, 5)]))  # a holds half the prompt
    state.apply("b", Batch(0.0, [Stored([77], None, list(range(16)), 16)]))  # b is fed but holds other text
    approx.observe(_req(IDS), "c")  # c publishes no events: the approximate index believes it holds it all
    assert idx.match(_req(IDS), ["a", "b", "c"]) == [0.5, 0.0, 1.0]


def test_a_pick_counts_as_pending_until_the_engine_reports_or_the_ttl_passes() -> None:
    clock = FakeClock()
    idx, state, _ = _index(clock)
    state.apply("a", Batch(0.0, [Stored([77], None, list(range(16)), 16)]))
    req = _req(IDS)
    idx.observe(req, "a")
    assert idx.match(_req(IDS), ["a"]) == [1.0]  # a burst behind the first request sees where it went
    clock.now += 6.0
    assert idx.match(_req(IDS), ["a"]) == [0.0]  # never confirmed: forgotten
    idx.observe(req, "a")
    state.apply("a", Batch(0.0, [_stored_for(IDS, 3)]))  # confirmed for 3 blocks, pending dropped for them
    assert idx.match(_req(IDS), ["a"]) == [1.0]  # 3 held + the rest still pending (max of the two runs)


def test_removed_blocks_stop_matching_and_restart_drops_everything() -> None:
    clock = FakeClock()
    idx, state, approx = _index(clock)
    state.apply("a", Batch(0.0, [_stored_for(IDS, 10)]))
    state.apply("a", Batch(0.0, [Removed([4])]))
    assert idx.match(_req(IDS), ["a"]) == [0.3]
    approx.observe(_req(IDS), "a")
    idx.drop("a")  # the datastore saw a restart
    assert state.index.count("a") == 0 and approx.size("a") == 0


def test_cold_endpoint_takes_the_better_of_precise_and_approximate() -> None:
    clock = FakeClock()
    idx, state, approx = _index(clock, cold_s=10.0)
    state.apply("a", Batch(0.0, [_stored_for(IDS, 2)]))
    approx.observe(_req(IDS), "a")
    state.resync("a")  # lost events: what it held before is unknown
    state.apply("a", Batch(0.0, [_stored_for(IDS, 2)]))
    assert idx.match(_req(IDS), ["a"]) == [1.0]
    clock.now += 11.0
    assert idx.match(_req(IDS), ["a"]) == [0.2]


def test_untokenizable_request_uses_the_approximate_index() -> None:
    clock = FakeClock()
    idx, state, approx = _index(clock)
    state.apply("a", Batch(0.0, [_stored_for(IDS, 10)]))
    req = RoutingRequest(model="m", prompt=b"y" * 600)
    approx.observe(req, "b")
    assert idx.match(req, ["a", "b"]) == [0.0, 1.0]


def _batch(events: list[Any]) -> bytes:
    return msgspec.msgpack.encode(structs("map").EventBatch(ts=0.0, events=events))


def test_the_default_registry_builds_it_from_config_and_routes_to_the_holder() -> None:
    clock = FakeClock()
    ds = make_datastore(["a", "b", "c"], clock=clock)
    state = KVEventState("tokens", clock=clock)
    cfg = RoutingConfig.model_validate({
        "plugins": [{"type": "precise-prefix-cache-scorer", "name": "prefix"},
                    {"type": "prefill-cost-scorer", "name": "prefill-cost"}],
        "profiles": [{"name": "precise", "plugins": [{"ref": "prefix", "weight": 2}, {"ref": "prefill-cost", "weight": 4}]}],
    })
    sched = build_scheduler(cfg, ds, rng=random.Random(0), clock=clock, kv_events=state)
    text = "The manual says to hold the button for ten seconds. " * 60
    body = {"model": "m", "prompt": text}
    req = RoutingRequest(model="m", prompt=text.encode(), route="completions", body=body, prompt_tokens=700)
    out: list[bytes] = []
    rec = KVEventRecorder(lambda evs: out.append(_batch(evs)))
    from simulator import tokenizer as sim_tok

    ids = sim_tok.encode(text)
    for name in ("a", "c"):
        state.apply(name, Batch(0.0, [Stored([1], None, list(range(16)), 16)]))  # fed, unrelated
    hashes = list(range(1000, 1000 + len(ids) // 16))
    rec.stored(hashes, 0, len(hashes), ids, 16, None, None)
    rec.end_step()
    state.apply("b", decode_batch(out[0]))
    decision = sched.schedule(req)
    assert decision.best.endpoint == "b"
    assert decision.best.scores["prefix"] == pytest.approx(len(hashes) * 16 / len(ids))
    with pytest.raises(ValueError, match="key_mode"):
        build_scheduler(cfg, ds, kv_events=KVEventState("engine"))


def _precise_scheduler(clock: FakeClock) -> tuple[Any, Any, KVEventState]:
    ds = make_datastore(["a", "b"], clock=clock)
    state = KVEventState("tokens", clock=clock)
    cfg = RoutingConfig.model_validate({
        "plugins": [{"type": "precise-prefix-cache-scorer", "name": "prefix", "params": {"pending_ttl_s": 60}}],
        "profiles": [{"name": "precise", "plugins": [{"ref": "prefix", "weight": 1}]}],
    })
    return build_scheduler(cfg, ds, rng=random.Random(0), clock=clock, kv_events=state), ds, state


def _text_req(text: str) -> RoutingRequest:
    body = {"model": "m", "prompt": text}
    return RoutingRequest(model="m", prompt=text.encode(), route="completions", body=body, prompt_tokens=700)


def test_a_restart_the_scraper_sees_clears_what_the_engine_held_and_the_pick_marks() -> None:
    from simulator import tokenizer as sim_tok
    from tests.unit.routing.helpers import metrics

    clock = FakeClock()
    sched, ds, state = _precise_scheduler(clock)
    held = "Restarted engines forget everything they cached. " * 60
    sent = "A prompt routed there but not yet reported stored. " * 60
    ids = sim_tok.encode(held)
    state.apply("a", Batch(0.0, [Stored([7], None, list(range(16)), 16)]))  # a: fed, holds nothing useful
    state.apply("b", Batch(0.0, [Stored(list(range(1, len(ids) // 16 + 1)), None, ids, 16)]))
    sched.observe(_text_req(sent), "b")  # pending on b until b reports it
    assert sched.schedule(_text_req(held)).best.endpoint == "b"
    assert sched.schedule(_text_req(sent)).best.scores["prefix"] > 0.9
    ds.update_metrics("b", metrics(process_start_time=1.0))
    ds.update_metrics("b", metrics(process_start_time=2.0))  # a new process: its cache is empty
    assert state.index.count("b") == 0
    for text in (held, sent):
        scores = {c.endpoint: c.scores["prefix"] for c in sched.schedule(_text_req(text)).ranked}
        assert scores == {"a": 0.0, "b": 0.0}, (text[:20], scores)


def test_pick_marks_are_bounded_and_expire() -> None:
    clock = FakeClock()
    state = KVEventState("tokens", clock=clock)
    state.apply("a", Batch(0.0, [Stored([77], None, list(range(16)), 16)]))
    idx = PreciseIndex(state, RequestKeyer(ListTokenizer(), "tokens"), ApproxPrefixIndex(64, 64, lambda e: 1000),
                       pending_ttl_s=5.0, clock=clock, max_pending=100)
    for i in range(50):  # 50 distinct 10-block prompts: 500 marks offered, at most 100 kept
        idx.observe(_req([(i + 1) * 1000 + t for t in range(160)]), "a")
    assert len(idx._pending["a"]) <= 100
    recent = _req([50 * 1000 + t for t in range(160)])
    assert idx.match(recent, ["a"]) == [1.0]  # the newest marks survive the cap
    assert idx.match(_req([1000 + t for t in range(160)]), ["a"]) == [0.0]  # the oldest went
    clock.now += 6.0
    idx.observe(_req([7] * 32), "a")  # the next pick sweeps what expired
    assert len(idx._pending["a"]) == 2
