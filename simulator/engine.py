"""A pure, synchronous model of a vLLM v1 engine: continuous batching over a paged prefix cache.

No I/O and no sleeping: `step(now)` says how long the step takes, so the same engine runs behind
HTTP in real time and in virtual time inside a routing evaluator.
"""
from __future__ import annotations

import bisect
import random
import zlib
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from simulator.kvcache import BlockHasher, KVCache, PythonHasher
from simulator.stats import EngineStats, Histogram

TokenSource = Callable[[int, int], list[int]]
Policy = Literal["fcfs", "priority"]


@dataclass
class EngineConfig:
    """Capacity, scheduler limits and the step-time model (all times in seconds).

    A step costs a base (the larger of the prefill and decode bases among the kinds of work in
    it), plus `prefill_per_token_s` for every UNCACHED prompt token computed, plus
    `decode_per_seq_s` per decoding sequence and `decode_per_kv_token_s` per context token read.
    """

    kv_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    prefill_base_s: float = 0.030
    prefill_per_token_s: float = 0.0002
    decode_base_s: float = 0.012
    decode_per_seq_s: float = 0.00006
    decode_per_kv_token_s: float = 0.0
    idle_step_s: float = 0.001
    enable_prefix_caching: bool = True
    scheduling_policy: Policy = "fcfs"
    max_loras: int = 1
    # With ignore_eos off, a request stops at a seeded position uniform in [1, natural_len_max].
    natural_len_max: int = 256
    seed: int = 0


@dataclass
class SimRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float = 0.0
    cache_salt: str | None = None
    priority: int = 0
    lora: str | None = None
    ignore_eos: bool = True
    seed: int | None = None
    output_offset: int = 0
    """Tokens of this output already produced elsewhere (vLLM's continue_final_message): the request
    produces the seeded output from this position on, so a resumed stream equals an unbroken one."""


@dataclass(slots=True)
class TokenEvent:
    """Tokens one request produced in one step; `time` is when the step ended (engine clock)."""

    request_id: str
    token_ids: list[int]
    is_first: bool
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    prompt_tokens: int
    time: float = 0.0


@dataclass(slots=True)
class StepOutcome:
    duration: float
    events: list[TokenEvent] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0


_WAITING, _RUNNING, _DONE = 0, 1, 2


@dataclass(eq=False, slots=True)
class _Seq:
    req: SimRequest
    order: int
    tokens: list[int]
    planned: list[int]
    stop_len: int
    stop_reason: str
    status: int = _WAITING
    computed: int = 0
    num_output: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    published: int = 0
    num_cached_tokens: int = -1
    last_token_time: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_token_ids)

    def key(self) -> tuple[int, float, int]:
        return (self.req.priority, self.req.arrival, self.order)


class KVEventSink(Protocol):
    """Hears of every prefix-cache change (simulator/kv_events.py's recorder); one batch per step."""

    def stored(self, hashes: Sequence[Hashable], start: int, end: int, token_ids: Sequence[int],
               block_size: int, cache_salt: str | None, lora: str | None) -> None: ...

    def removed(self, h: Hashable) -> None: ...

    def cleared(self) -> None: ...

    def end_step(self) -> None: ...


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (start, end) pairs."""
    runs: list[tuple[int, int]] = []
    start = prev = indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    return runs


def default_token_source(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(n)]


class Engine:
    """Scheduler + KV cache + time model. Single-threaded; the caller owns the clock."""

    def __init__(self, config: EngineConfig, token_source: TokenSource | None = None, *,
                 block_hasher: BlockHasher | None = None, kv_events: KVEventSink | None = None) -> None:
        if config.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {config.scheduling_policy!r}")
        self.config = config
        self.kv = KVCache(config.kv_blocks, config.block_size, config.enable_prefix_caching)
        # KV events (simulator/kv_events.py): how blocks are named, and who hears of cache changes.
        self._extend = (block_hasher or PythonHasher()).extend
        self._kv_events = kv_events
        self.kv.listener = kv_events
        self.max_model_len = min(config.max_model_len, config.kv_blocks * config.block_size)
        self._tokens = token_source or default_token_source
        self._seqs: dict[str, _Seq] = {}
        self._running: list[_Seq] = []
        self._fcfs: deque[_Seq] = deque()
        self._prio: list[_Seq] = []
        self._order = 0
        self._stats = EngineStats()

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: SimRequest) -> None:
        n_prompt = len(req.prompt_token_ids)
        if req.request_id in self._seqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if n_prompt == 0:
            raise ValueError("prompt must contain at least one token")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if n_prompt + req.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n_prompt}) + max_tokens ({req.max_tokens}) exceeds the "
                             f"maximum context length {self.max_model_len}")
        seed = req.seed if req.seed is not None else zlib.crc32(req.request_id.encode()) ^ self.config.seed
        offset = req.output_offset
        stop_len, reason = req.max_tokens, "length"
        if not req.ignore_eos:
            # The natural end is a position in the whole output, wherever it was continued from.
            eos_at = random.Random(seed ^ 0x5EED).randint(1, max(1, self.config.natural_len_max))
            if eos_at - offset <= req.max_tokens:
                stop_len, reason = max(1, eos_at - offset), "stop"
        self._order += 1
        tokens = self._tokens(seed, offset + stop_len)[offset:]
        seq = _Seq(req, self._order, list(req.prompt_token_ids), tokens, stop_len, reason)
        self._seqs[req.request_id] = seq
        self._push_waiting(seq, front=False)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown or finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.status == _RUNNING:
            self._running.remove(seq)
        elif seq.status == _WAITING:
            if self.config.scheduling_policy == "priority":
                self._prio.remove(seq)
            else:
                self._fcfs.remove(seq)
        seq.status = _DONE
        self.kv.free(seq.blocks)
        return True

    def has_work(self) -> bool:
        return bool(self._running or self._fcfs or self._prio)

    # ---- the step ------------------------------------------------------------------------
    def step(self, now: float) -> StepOutcome:
        """Schedule one batch at `now`, model its duration and emit the tokens it produces."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: dict[_Seq, int] = {}
        preempted = False

        # Running requests first, in order; on a block shortage preempt (recompute) the newest.
        for seq in list(self._running):
            if budget <= 0:
                break
            if seq.status != _RUNNING:
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            while True:
                if self.kv.allocate(seq.blocks, (), seq.computed + n):
                    self._publish(seq, seq.computed + n)
                    scheduled[seq] = n
                    budget -= n
                    break
                victim = self._victim()
                self._preempt(victim)
                preempted = True
                budget += scheduled.pop(victim, 0)
                if victim is seq:
                    break

        # Then admit waiting requests, unless this step already had to preempt.
        if not preempted:
            budget = self._admit(scheduled, budget)

        if self._kv_events is not None:
            self._kv_events.end_step()  # one batch per step, as vLLM's scheduler publishes
        if not scheduled:
            return StepOutcome(cfg.idle_step_s if self.has_work() else 0.0)

        prefill_tokens = decode_seqs = context = 0
        for seq, n in scheduled.items():
            if n == 1 and seq.computed >= seq.prompt_len:
                decode_seqs += 1
                context += seq.computed
            else:
                prefill_tokens += n
        base = max(cfg.prefill_base_s if prefill_tokens else 0.0, cfg.decode_base_s if decode_seqs else 0.0)
        duration = (base + cfg.prefill_per_token_s * prefill_tokens + cfg.decode_per_seq_s * decode_seqs
                    + cfg.decode_per_kv_token_s * context)
        end = now + duration
        events = [ev for seq, n in scheduled.items() if (ev := self._advance(seq, n, end)) is not None]
        if any(s.status == _DONE for s in self._running):
            self._running = [s for s in self._running if s.status == _RUNNING]
        return StepOutcome(duration, events, prefill_tokens, decode_seqs)

    def _admit(self, scheduled: dict[_Seq, int], budget: int) -> int:
        cfg, kv, st = self.config, self.kv, self._stats
        loras = {s.req.lora for s in self._running if s.req.lora is not None}
        skipped: list[_Seq] = []
        while budget > 0 and len(self._running) < cfg.max_num_seqs:
            seq = self._pop_waiting()
            if seq is None:
                break
            lora = seq.req.lora
            if lora is not None and lora not in loras and len(loras) >= cfg.max_loras:
                skipped.append(seq)
                continue
            hits: list[int] = []
            if seq.computed == 0:
                self._extend(seq.hashes, seq.tokens, cfg.block_size, seq.req.cache_salt, lora)
                # The last token is always recomputed so the model has logits to sample from.
                hits = kv.computed_blocks(seq.hashes[:(len(seq.tokens) - 1) // cfg.block_size])
            computed = len(hits) * cfg.block_size
            n = min(len(seq.tokens) - computed, budget)
            if not kv.allocate(seq.blocks, hits, computed + n):
                self._push_waiting(seq, front=True)
                break
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = computed
                st.prefix_cache_queries += seq.prompt_len
                st.prefix_cache_hits += computed
            seq.computed, seq.published, seq.status = computed, len(hits), _RUNNING
            self._publish(seq, computed + n)
            self._running.append(seq)
            if lora is not None:
                loras.add(lora)
            scheduled[seq] = n
            budget -= n
        for seq in reversed(skipped):
            self._push_waiting(seq, front=True)
        return budget

    def _publish(self, seq: _Seq, num_tokens: int) -> None:
        """Register the full blocks this step will have computed, at allocation time.

        As vLLM v1 does: ``KVCacheManager.allocate_slots`` (vllm/v1/core/kv_cache_manager.py) ends
        with ``coordinator.cache_blocks(request, min(computed + num_new_tokens, request.num_tokens))``,
        so a request that ``Scheduler.schedule`` (vllm/v1/core/sched/scheduler.py) looks up later in
        the same step, or in a later step while this one is still prefilling in chunks, hits the
        blocks this step computes instead of recomputing them.
        """
        bs = self.config.block_size
        full = min(num_tokens, len(seq.tokens)) // bs
        if full > seq.published:
            self._extend(seq.hashes, seq.tokens, bs, seq.req.cache_salt, seq.req.lora)
            new = self.kv.cache_blocks(seq.blocks, seq.hashes, seq.published, full)
            if new and self._kv_events is not None:
                for start, end in _runs(new):
                    self._kv_events.stored(seq.hashes, start, end, seq.tokens, bs, seq.req.cache_salt, seq.req.lora)
            seq.published = full

    def _advance(self, seq: _Seq, n: int, end: float) -> TokenEvent | None:
        st = self._stats
        seq.computed += n
        if seq.computed < len(seq.tokens):
            return None  # a prefill chunk (or a recompute) that has not reached the end yet
        token = seq.planned[seq.num_output]
        seq.tokens.append(token)
        seq.num_output += 1
        first = seq.num_output == 1
        st.generation_tokens_total += 1
        if first:
            st.prompt_tokens_total += seq.prompt_len
            st.ttft.observe(end - seq.req.arrival)
        else:
            st.itl.observe(end - seq.last_token_time)
        seq.last_token_time = end
        finished = seq.num_output >= seq.stop_len
        if finished:
            seq.status = _DONE
            self.kv.free(seq.blocks)
            del self._seqs[seq.req.request_id]
            st.e2e.observe(end - seq.req.arrival)
            st.requests_finished_total += 1
        return TokenEvent(seq.req.request_id, [token], first, finished,
                          seq.stop_reason if finished else None, seq.num_cached_tokens, seq.prompt_len, end)

    # ---- queues and preemption -------------------------------------------------------------
    def _push_waiting(self, seq: _Seq, front: bool) -> None:
        seq.status = _WAITING
        if self.config.scheduling_policy == "priority":
            bisect.insort(self._prio, seq, key=_Seq.key)
        elif front:
            self._fcfs.appendleft(seq)
        else:
            self._fcfs.append(seq)

    def _pop_waiting(self) -> _Seq | None:
        if self._prio:
            return self._prio.pop(0)
        return self._fcfs.popleft() if self._fcfs else None

    def _victim(self) -> _Seq:
        if self.config.scheduling_policy == "priority":
            return max(self._running, key=lambda s: (s.req.priority, s.req.arrival, s.order))
        return self._running[-1]

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        # Blocks published for a chunk that will now never run hold no KV: they must not be hits.
        self.kv.uncache(seq.blocks, seq.computed // self.config.block_size, seq.published)
        self.kv.free(seq.blocks)
        seq.computed = seq.published = 0
        self._stats.num_preemptions_total += 1
        self._push_waiting(seq, front=True)

    # ---- observation -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        st = self._stats
        waiting = [*self._fcfs, *self._prio]
        return EngineStats(
            num_running=len(self._running), num_waiting=len(waiting), kv_cache_usage=self.kv.usage(),
            num_free_blocks=self.kv.num_free_blocks, num_cached_blocks=self.kv.num_cached_blocks,
            prefix_cache_queries=st.prefix_cache_queries, prefix_cache_hits=st.prefix_cache_hits,
            prompt_tokens_total=st.prompt_tokens_total, generation_tokens_total=st.generation_tokens_total,
            num_preemptions_total=st.num_preemptions_total, requests_finished_total=st.requests_finished_total,
            running_loras=tuple(sorted({s.req.lora for s in self._running if s.req.lora})),
            waiting_loras=tuple(sorted({s.req.lora for s in waiting if s.req.lora})),
            ttft=st.ttft.copy(), itl=st.itl.copy(), e2e=st.e2e.copy())

    def cached_prefix_tokens(self, prompt_token_ids: list[int], cache_salt: str | None = None,
                             lora: str | None = None) -> int:
        """Leading prompt tokens whose full blocks are in the prefix cache right now."""
        hashes = self._extend([], prompt_token_ids, self.config.block_size, cache_salt, lora)
        return len(self.kv.computed_blocks(hashes)) * self.config.block_size

    def reset_cache(self) -> bool:
        done = self.kv.reset()
        if done and self._kv_events is not None:
            self._kv_events.end_step()
        return done

    @property
    def histograms(self) -> tuple[Histogram, Histogram, Histogram]:
        return self._stats.ttft, self._stats.itl, self._stats.e2e
