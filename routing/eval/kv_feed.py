"""KV events in the evaluator: each simulated engine publishes its cache changes, delivered to the
gateway's event-fed index in virtual time after a configurable delay, with configurable loss.

Batches go through the real wire encoding and decoder and the gateway's sequence handling (a lost
batch is a gap: replayed from the engine's buffer after ``replay_delay_s``, or a resync), so
approximate, precise and oracle routing are compared on the same traces.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from routing.kv.keys import RequestKeyer
from routing.kv.pending import ForeignMark, PendingExchange
from routing.kv.state import KeyMode, KVEventState, SequenceTracker
from routing.kv.wire import decode_batch
from routing.plugins.base import BuildContext, PluginFactory
from routing.plugins.precise_prefix import PreciseIndex, PrecisePrefixParams
from routing.plugins.prefix_scorer import PrefixCacheScorer
from routing.plugins.registry import Registry
from routing.prefix import ApproxPrefixIndex
from routing.types import RoutingRequest
from simulator.kv_events import KVEventRecorder, structs
from simulator.kvcache import PythonHasher

__all__ = ["EVAL_PRECISE", "KVFeed", "KVFeedOptions"]

EVAL_PRECISE = "eval-precise-prefix-scorer"


@dataclass(frozen=True)
class KVFeedOptions:
    delay_s: float = 0.005
    """Engine publish -> applied in the gateway's index (ZMQ hop plus decode)."""
    loss: float = 0.0
    """Probability that a batch never arrives on the SUB socket."""
    replay: bool = True
    """Lost batches come back from the engine's replay buffer; otherwise the endpoint is resynced."""
    replay_delay_s: float = 0.002
    mode: KeyMode = "tokens"
    seed: int = 0
    share_pending_s: float | None = None
    """With gateway replicas: share the precise scorer's pending marks as the gateway does through Redis
    (gateway/state/inflight.py): a replica's marks reach "Redis" this many seconds after its pick, and
    another replica applies them at its next decision (its pre-dispatch read). None: not shared."""


class _TraceTokenizer:
    """The evaluator knows each request's token ids (what the engine gets): a gateway that tokenizes
    exactly as the engine does."""

    def __init__(self, tokens_of: Callable[[RoutingRequest], list[int]]) -> None:
        self._tokens_of = tokens_of

    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        return self._tokens_of(req) or None


class KVFeed:
    def __init__(self, options: KVFeedOptions, schedule: Callable[[float, Callable[[], None]], None],
                 clock: Callable[[], float]) -> None:
        self.options = options
        self._schedule = schedule
        self._clock = clock
        self.state = KVEventState(options.mode, clock=clock)
        self._rng = random.Random(options.seed)
        self._encoder = msgspec.msgpack.Encoder()
        self._batch = structs("map").EventBatch
        self._seq: dict[str, int] = {}
        self._buffers: dict[str, dict[int, bytes]] = {}
        self._trackers: dict[str, SequenceTracker] = {}
        self.published = self.lost = 0
        self._exchanges: list[PendingExchange] = []  # one per replica's precise scorer, when shared

    def recorder(self, endpoint: str) -> KVEventRecorder:
        self._seq[endpoint] = 0
        self._buffers[endpoint] = {}
        self._trackers[endpoint] = SequenceTracker()
        self.state.register(endpoint)
        return KVEventRecorder(lambda events: self._publish(endpoint, events))

    def _publish(self, endpoint: str, events: list[Any]) -> None:
        seq = self._seq[endpoint]
        self._seq[endpoint] = seq + 1
        payload = self._encoder.encode(self._batch(ts=self._clock(), events=events, data_parallel_rank=0))
        self._buffers[endpoint][seq] = payload
        self.published += 1
        if self.options.loss and self._rng.random() < self.options.loss:
            self.lost += 1
            return
        self._schedule(self._clock() + self.options.delay_s, lambda: self._deliver(endpoint, seq, payload))

    def _deliver(self, endpoint: str, seq: int, payload: bytes) -> None:
        tracker = self._trackers[endpoint]
        verdict = tracker.see(seq)
        if verdict == "gap":
            last = tracker.last if tracker.last is not None else -1
            if self.options.replay:
                # The replay round trip is modelled as instantaneous from here; its delay is the feed's.
                for missing in range(last + 1, seq):
                    self.state.apply(endpoint, decode_batch(self._buffers[endpoint][missing]))
                self.state.register(endpoint).replays += 1
            else:
                self.state.resync(endpoint)
        elif verdict == "first" and seq > 0 and not self.options.replay:
            self.state.resync(endpoint)
        tracker.accept(seq)
        self.state.apply(endpoint, decode_batch(payload))
        self._buffers[endpoint].pop(seq - 10_000, None)  # vLLM keeps the last 10,000 batches

    def _exchange(self) -> PendingExchange | None:
        delay = self.options.share_pending_s
        if delay is None:
            return None
        ex = PendingExchange()
        self._exchanges.append(ex)

        def sent() -> None:
            for endpoint, keys in ex.take():
                marks = [ForeignMark(endpoint, keys)]
                for other in self._exchanges:
                    if other is not ex:
                        self._schedule(self._clock() + delay, functools.partial(other.deliver, marks))

        ex.attach(sent)
        return ex

    def register(self, registry: Registry, tokens_of: Callable[[RoutingRequest], list[int]]) -> None:
        """Add ``eval-precise-prefix-scorer``: the precise scorer over this feed's index, tokenizing as the engine."""
        tokenizer = _TraceTokenizer(tokens_of)

        def build(name: str, params: PrecisePrefixParams, deps: BuildContext) -> PrefixCacheScorer:
            state = deps.kv_events or self.state
            keyer = RequestKeyer(tokenizer, state.mode, engine_hasher=PythonHasher() if state.mode == "engine" else None,
                                 max_blocks=params.max_blocks)
            fb = params.fallback

            def capacity_of(endpoint: str) -> int:
                m = deps.datastore.metrics_of(endpoint)
                if m is None or m.kv_capacity_tokens is None:
                    return fb.fallback_capacity
                return int(m.kv_capacity_tokens * fb.bytes_per_token / fb.block_size)

            fallback = ApproxPrefixIndex(fb.block_size, fb.max_blocks, capacity_of)
            index = PreciseIndex(state, keyer, fallback, default_block_size=params.default_block_size,
                                 cpu_weight=params.cpu_weight, pending_ttl_s=params.pending_ttl_s, clock=deps.clock,
                                 exchange=self._exchange())
            deps.datastore.add_restart_listener(index.drop)
            return PrefixCacheScorer(name, index, fb.block_size, fb.home_seen_capacity, deps.clock, fb.share_window_s)

        registry.add(PluginFactory(EVAL_PRECISE, "scorer", PrecisePrefixParams, build,
                                   "precise scorer fed by the evaluator's engines (virtual-time KV events)"))
