"""Engine: batching, prefix caching, preemption, chunked prefill, the time model, virtual time."""
from __future__ import annotations

import dataclasses
import time

import pytest

from simulator.engine import Engine, EngineConfig, SimRequest, StepOutcome, TokenEvent
from simulator.profiles import get_profile

FAST = EngineConfig(kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
                    prefill_base_s=0.01, prefill_per_token_s=0.001, decode_base_s=0.005, decode_per_seq_s=0.001)


def cfg(**kw: object) -> EngineConfig:
    return dataclasses.replace(FAST, **kw)  # type: ignore[arg-type]


def req(rid: str, prompt: list[int], max_tokens: int = 4, arrival: float = 0.0, **kw: object) -> SimRequest:
    return SimRequest(rid, prompt, max_tokens, arrival, **kw)  # type: ignore[arg-type]


def run(engine: Engine, now: float = 0.0, limit: int = 10_000) -> tuple[float, list[TokenEvent], list[StepOutcome]]:
    events: list[TokenEvent] = []
    outs: list[StepOutcome] = []
    for _ in range(limit):
        if not engine.has_work():
            break
        out = engine.step(now)
        now += out.duration
        events += out.events
        outs.append(out)
    return now, events, outs


def first(events: list[TokenEvent], rid: str) -> TokenEvent:
    return next(e for e in events if e.request_id == rid and e.is_first)


def test_one_request_generates_max_tokens_then_finishes() -> None:
    eng = Engine(cfg())
    eng.add_request(req("a", list(range(10)), max_tokens=5))
    _, events, _ = run(eng)
    assert [len(e.token_ids) for e in events] == [1] * 5
    assert events[0].is_first and not any(e.is_first for e in events[1:])
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert events[0].prompt_tokens == 10
    st = eng.stats()
    assert (st.generation_tokens_total, st.prompt_tokens_total, st.num_running, st.kv_cache_usage) == (5, 10, 0, 0.0)
    assert st.ttft.count == 1 and st.itl.count == 4 and st.e2e.count == 1


def test_shared_prefix_hits_cache_in_full_blocks() -> None:
    eng = Engine(cfg())
    prefix = list(range(100, 110))  # 10 tokens = 2 full blocks of 4 + 2
    eng.add_request(req("a", prefix + [1, 2, 3]))
    run(eng)
    assert eng.cached_prefix_tokens(prefix) == 8
    eng.add_request(req("b", prefix + [7, 8, 9]))
    _, events, _ = run(eng)
    assert first(events, "b").num_cached_tokens == 8
    st = eng.stats()
    assert st.prefix_cache_queries == 26 and st.prefix_cache_hits == 8


def test_same_step_admission_hits_blocks_the_first_request_is_computing() -> None:
    # vLLM v1 caches a block's hash in allocate_slots, before the forward pass: the second request
    # of a new prefix group admitted in the same step shares the first one's blocks.
    eng = Engine(cfg())
    prefix = list(range(100, 116))  # 4 full blocks
    eng.add_request(req("a", prefix + [1, 2, 3]))
    eng.add_request(req("b", prefix + [7, 8, 9]))
    out = eng.step(0.0)
    assert out.num_prefill_tokens == 19 + 3  # b computes only its own 3 tokens
    _, events, _ = run(eng, out.duration)
    assert first(out.events + events, "a").num_cached_tokens == 0
    assert first(out.events + events, "b").num_cached_tokens == 16


def test_request_hits_blocks_of_a_prefill_still_running_in_chunks() -> None:
    eng = Engine(cfg(max_num_batched_tokens=64))
    doc = list(range(1000, 1100))  # 100 tokens: chunks of 64 then 36
    eng.add_request(req("a", doc))
    t = eng.step(0.0).duration  # a's first chunk
    eng.add_request(req("b", doc + [5, 6, 7, 8, 9, 10, 11, 12]))
    out = eng.step(t)  # a's last chunk (36) and b, which sees blocks 0..24 published by a's allocation
    assert out.num_prefill_tokens == 36 + 8
    _, events, _ = run(eng, t + out.duration)
    assert first(out.events + events, "b").num_cached_tokens == 100


@pytest.mark.parametrize(("salt_a", "lora_a", "salt_b", "lora_b", "hit"), [
    (None, None, None, None, True),
    ("s1", None, "s1", None, True),
    ("s1", None, "s2", None, False),
    (None, None, "s1", None, False),
    (None, "adapter", None, "adapter", True),
    (None, "adapter", None, None, False),
])
def test_cache_salt_and_lora_partition_the_cache(salt_a: str | None, lora_a: str | None,
                                                  salt_b: str | None, lora_b: str | None, hit: bool) -> None:
    eng = Engine(cfg())
    prompt = list(range(20))
    eng.add_request(req("a", prompt, cache_salt=salt_a, lora=lora_a))
    run(eng)
    eng.add_request(req("b", prompt, cache_salt=salt_b, lora=lora_b))
    _, events, _ = run(eng)
    assert (first(events, "b").num_cached_tokens > 0) is hit


def test_fully_cached_prompt_still_recomputes_last_token() -> None:
    eng = Engine(cfg())
    prompt = list(range(16))  # exactly 4 blocks
    eng.add_request(req("a", prompt))
    run(eng)
    eng.add_request(req("b", prompt))
    _, events, _ = run(eng)
    assert first(events, "b").num_cached_tokens == 12


def test_lru_evicts_least_recently_freed_blocks() -> None:
    eng = Engine(cfg(kv_blocks=8, max_num_seqs=1))  # 8 blocks of 4 tokens
    a, b, c = ([n] * 12 for n in (1, 2, 3))  # 3 full blocks each (+1 block for output)
    for rid, p in (("a", a), ("b", b)):
        eng.add_request(req(rid, p, max_tokens=1))
        run(eng)
    assert eng.cached_prefix_tokens(a) == 12 and eng.cached_prefix_tokens(b) == 12
    eng.add_request(req("c", c, max_tokens=1))
    run(eng)
    # c needed 4 blocks; only "a" (freed first) was evicted.
    assert eng.cached_prefix_tokens(a) < 12
    assert eng.cached_prefix_tokens(b) == 12 and eng.cached_prefix_tokens(c) == 12


def test_preempts_newest_running_request_when_blocks_run_out() -> None:
    eng = Engine(cfg(kv_blocks=10, max_num_seqs=4))
    for i in range(3):
        eng.add_request(req(f"r{i}", [i + 1] * 10, max_tokens=12))
    _, events, _ = run(eng)
    st = eng.stats()
    assert st.num_preemptions_total >= 1
    for i in range(3):
        got = [t for e in events if e.request_id == f"r{i}" for t in e.token_ids]
        assert len(got) == 12
    assert eng.stats().kv_cache_usage == 0.0


def test_chunked_prefill_respects_token_budget() -> None:
    eng = Engine(cfg(max_num_batched_tokens=16, kv_blocks=64))
    eng.add_request(req("long", list(range(50)), max_tokens=2))
    outs = []
    while eng.has_work():
        out = eng.step(0.0)
        outs.append(out)
    prefill = [o.num_prefill_tokens for o in outs if o.num_prefill_tokens]
    assert prefill == [16, 16, 16, 2]
    assert not outs[0].events and outs[3].events[0].is_first


def test_decode_sequences_share_the_budget_with_prefill() -> None:
    eng = Engine(cfg(max_num_batched_tokens=20))
    eng.add_request(req("a", [1] * 8, max_tokens=10))
    eng.step(0.0)
    eng.add_request(req("b", list(range(40)), max_tokens=2))
    out = eng.step(1.0)
    assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 19


@pytest.mark.parametrize("uncached", [16, 64, 128])
def test_ttft_grows_with_uncached_tokens(uncached: int) -> None:
    def ttft(prompt_len: int, warm: int) -> float:
        eng = Engine(cfg(max_num_batched_tokens=512, max_model_len=512, kv_blocks=256))
        prompt = list(range(prompt_len))
        if warm:
            eng.add_request(req("w", prompt[:warm], max_tokens=1))
            run(eng)
        eng.add_request(req("x", prompt, max_tokens=1, arrival=0.0))
        _, events, _ = run(eng)
        return first(events, "x").time
    cold = ttft(uncached + 128, 0)
    warm = ttft(uncached + 128, 128)
    assert warm < cold
    assert warm == pytest.approx(0.01 + 0.001 * uncached)


def test_decode_step_grows_with_batch_size() -> None:
    def decode_step(n: int) -> float:
        eng = Engine(cfg(max_num_seqs=16, kv_blocks=256))
        for i in range(n):
            eng.add_request(req(f"r{i}", [i] * 4, max_tokens=5))
        eng.step(0.0)
        return eng.step(1.0).duration
    steps = [decode_step(n) for n in (1, 4, 16)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert steps[0] == pytest.approx(0.005 + 0.001)


def test_max_num_seqs_caps_the_batch_and_queues_the_rest() -> None:
    eng = Engine(cfg(max_num_seqs=2))
    for i in range(5):
        eng.add_request(req(f"r{i}", [i] * 4, max_tokens=3))
    eng.step(0.0)
    st = eng.stats()
    assert (st.num_running, st.num_waiting) == (2, 3)


def test_priority_policy_admits_lower_value_first() -> None:
    eng = Engine(cfg(max_num_seqs=1, scheduling_policy="priority"))
    eng.add_request(req("low", [1] * 4, max_tokens=1, priority=5))
    eng.add_request(req("high", [2] * 4, max_tokens=1, priority=-1))
    assert eng.step(0.0).events[0].request_id == "high"


def test_abort_frees_blocks_and_queue_slot() -> None:
    eng = Engine(cfg())
    eng.add_request(req("a", list(range(20)), max_tokens=50))
    eng.step(0.0)
    assert eng.stats().kv_cache_usage > 0
    assert eng.abort("a") and not eng.abort("a")
    assert not eng.has_work() and eng.stats().kv_cache_usage == 0.0


def test_ignore_eos_false_stops_deterministically_by_seed() -> None:
    def tokens(seed: int) -> list[int]:
        eng = Engine(cfg(natural_len_max=20))
        eng.add_request(req("a", [1, 2, 3], max_tokens=100, ignore_eos=False, seed=seed))
        _, events, _ = run(eng)
        assert events[-1].finish_reason == "stop"
        return [t for e in events for t in e.token_ids]
    assert tokens(7) == tokens(7)
    assert len({tuple(tokens(s)) for s in range(5)}) > 1


@pytest.mark.parametrize(("prompt", "max_tokens", "msg"), [
    ([], 4, "at least one token"), ([1], 0, "max_tokens"), ([1] * 250, 10, "context length"),
])
def test_add_request_rejects_bad_input(prompt: list[int], max_tokens: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Engine(cfg()).add_request(req("a", prompt, max_tokens))


def test_reset_cache_only_when_idle() -> None:
    eng = Engine(cfg())
    eng.add_request(req("a", list(range(20)), max_tokens=1))
    run(eng)
    assert eng.cached_prefix_tokens(list(range(20))) == 20
    assert eng.reset_cache() and eng.cached_prefix_tokens(list(range(20))) == 0


def test_virtual_time_replays_2000_requests_quickly() -> None:
    eng = Engine(get_profile("h100-8b", kv_blocks=4000))
    system = list(range(1000, 1400))
    pending = [req(f"r{i}", system + [i % 97] * 40 + [i], max_tokens=32, arrival=i * 0.01) for i in range(2000)]
    started = time.perf_counter()
    now, done, cached = 0.0, 0, 0
    while pending or eng.has_work():
        while pending and pending[0].arrival <= now:
            eng.add_request(pending.pop(0))
        if not eng.has_work():
            now = pending[0].arrival
            continue
        out = eng.step(now)
        now += out.duration
        done += sum(e.finished for e in out.events)
        cached += sum(e.num_cached_tokens for e in out.events if e.is_first)
    assert time.perf_counter() - started < 5.0
    assert done == 2000 and cached >= 2000 * 400


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_a_continued_output_goes_on_exactly_where_the_broken_one_stopped(ignore_eos: bool) -> None:
    """continue_final_message: with the same seed, k tokens here plus the rest elsewhere equal one run."""
    def tokens(engine: Engine, r: SimRequest) -> tuple[list[int], str | None]:
        engine.add_request(r)
        _, events, _ = run(engine)
        mine = [e for e in events if e.request_id == r.request_id]
        return [t for e in mine for t in e.token_ids], mine[-1].finish_reason

    long = cfg(natural_len_max=30, max_model_len=256)
    whole, finish = tokens(Engine(long), req("w", [1, 2, 3], 40, seed=7, ignore_eos=ignore_eos))
    for k in (1, 5, len(whole) - 1):
        head, _ = tokens(Engine(long), req("h", [1, 2, 3], k, seed=7, ignore_eos=ignore_eos))
        rest, rest_finish = tokens(Engine(long), req("r", [1, 2, 3, *head], 40 - k, seed=7,
                                                     ignore_eos=ignore_eos, output_offset=k))
        assert head + rest == whole and rest_finish == finish
