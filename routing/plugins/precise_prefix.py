"""Scorer ``precise-prefix-cache-scorer``: the fraction of the prompt each endpoint really holds, from KV events.

The request is tokenized as the engine will (``routing/kv/tokenize.py``) and keyed as the index is
(``routing/kv/keys.py``); endpoints with no events yet, or cold after lost events, fall back to the
approximate index, which keeps learning from every pick. A pick also marks its blocks *pending* on the
chosen endpoint until the engine reports them, so a burst sharing a new prefix is not spread.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field

from routing.kv.keys import RequestKeyer
from routing.kv.pending import PendingExchange
from routing.kv.state import KeyMode, KVEventState
from routing.kv.tokenize import HFTokenizer, PromptTokenizer, SimTokenizer
from routing.plugins.base import BuildContext, Params, PluginFactory
from routing.plugins.prefix_scorer import PrefixCacheScorer, PrefixParams
from routing.prefix import ApproxPrefixIndex
from routing.types import RoutingRequest

__all__ = ["FACTORY", "PreciseIndex", "PrecisePrefixParams"]


class PrecisePrefixParams(Params):
    key_mode: Literal["engine", "tokens"] = Field(
        default="tokens", description="tokens: key blocks by the gateway's hash of their token ids (llm-d's way; "
        "engine hash settings need not match); engine: by the engine's own block hashes")
    tokenizer: Literal["sim", "hf"] = Field(default="sim", description="sim: the simulator's template and "
                                            "tiktoken; hf: tokenizer_json + chat_template")
    tokenizer_json: str | None = None
    chat_template: str | None = Field(default=None, description="path of a file holding the Jinja chat template")
    special_tokens: dict[str, str] = Field(default_factory=dict, description="template variables, e.g. bos_token")
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = "sha256"
    hash_seed: str | None = Field(default=None, description="the engines' PYTHONHASHSEED (engine mode)")
    lora_paths: dict[str, str] = Field(default_factory=dict, description="LoRA name -> path, as the engines load them")
    default_block_size: int = Field(default=16, ge=1, description="until an endpoint's BlockStored says otherwise")
    cpu_weight: float = Field(default=0.5, ge=0, le=1, description="a block held only on CPU counts this much")
    pending_ttl_s: float = Field(default=30.0, gt=0, description="how long a pick's blocks count as on their way")
    max_blocks: int = Field(default=8192, ge=1)
    segment_chars: int = Field(default=2048, ge=64, description="tokenization cache segment length")
    fallback: PrefixParams = Field(default_factory=PrefixParams, description="the approximate index's parameters")


class PreciseIndex:
    """A :class:`~routing.prefix.PrefixIndex` over the event-fed block index, with the approximate one as fallback."""

    def __init__(self, state: KVEventState, keyer: RequestKeyer, fallback: ApproxPrefixIndex, *,
                 default_block_size: int = 16, cpu_weight: float = 0.5, pending_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, max_pending: int = 262_144,
                 exchange: PendingExchange | None = None) -> None:
        self.state = state
        self.keyer = keyer
        self.fallback = fallback
        self.default_block_size = default_block_size
        self.cpu_weight = cpu_weight
        self.pending_ttl_s = pending_ttl_s
        self._clock = clock
        self._max_pending = max_pending
        self._pending: dict[str, OrderedDict[int, float]] = {}
        # Other gateway replicas' marks arrive here and count as this replica's own (routing/kv/pending.py).
        self.exchange = exchange
        state.on_stored(self._confirmed)
        # An evicted block is gone whatever this gateway sent: a pick that hit it must not keep it alive.
        state.on_removed(self._confirmed)
        state.on_forget(self._forget_pending)

    def match(self, req: RoutingRequest, endpoints: Sequence[str]) -> list[float]:
        state = self.state
        if self.exchange is not None:
            for mark in self.exchange.pull():
                if state.fed(mark.endpoint):
                    self._mark(mark.endpoint, mark.keys, self._clock() + self.pending_ttl_s - mark.age_s)
        precise = [e for e in endpoints if state.fed(e)]
        tokens = self.keyer.tokens(req) if precise else None
        approx: dict[str, float] = {}
        if tokens is None or len(precise) < len(endpoints) or any(state.cold(e) for e in precise):
            approx = dict(zip(endpoints, self.fallback.match(req, endpoints), strict=True))
        if not tokens:
            return [approx.get(e, 0.0) for e in endpoints]
        n = len(tokens)
        now = self._clock()
        found: dict[str, float] = {}
        by_size: dict[int, list[str]] = {}
        for e in precise:
            by_size.setdefault(state.block_size(e) or self.default_block_size, []).append(e)
        for size, group in by_size.items():
            keys = self.keyer.keys(req, size)
            held = state.index.matched_blocks(keys, group, self.cpu_weight)
            for e in group:
                blocks = self._extend_run(e, keys, held[e], now)
                frac = min(1.0, blocks * size / n)
                found[e] = max(frac, approx.get(e, 0.0)) if state.cold(e) else frac
        return [found[e] if e in found else approx.get(e, 0.0) for e in endpoints]

    def _extend_run(self, endpoint: str, keys: Sequence[int], held: float, now: float) -> float:
        """Continue the held run through blocks this gateway sent there and the engine has not reported yet
        (or has, past a pending stretch)."""
        pending = self._pending.get(endpoint)
        if not pending:
            return held
        run = int(held)
        get, holders = pending.get, self.state.index.holders
        while run < len(keys):
            expiry = get(keys[run])
            if (expiry is None or expiry < now) and endpoint not in holders(keys[run]):
                break
            run += 1
        return held + (run - int(held))

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        self.fallback.observe(req, endpoint)
        if not self.state.fed(endpoint):
            return
        keys = self.keyer.keys(req, self.state.block_size(endpoint) or self.default_block_size)
        if not keys:
            return
        exchange = self.exchange
        if exchange is not None and exchange.active:
            # Only what the engine does not hold yet is news to the other replicas (they see the same events).
            held = int(self.state.index.matched_blocks(keys, (endpoint,))[endpoint])
            if held < len(keys):
                exchange.mark(endpoint, keys[held:])
        self._mark(endpoint, keys, self._clock() + self.pending_ttl_s)

    def _mark(self, endpoint: str, keys: Sequence[int], expiry: float) -> None:
        now = self._clock()
        if expiry < now:
            return
        pending = self._pending.setdefault(endpoint, OrderedDict())
        for key in keys:
            was = pending.get(key)
            if was is None or was < expiry:  # another replica's older mark must not shorten ours
                pending[key] = expiry
                pending.move_to_end(key)
        # Oldest first: drop what expired, and anything past the cap.
        while pending:
            key, when = next(iter(pending.items()))
            if when >= now and len(pending) <= self._max_pending:
                break
            pending.popitem(last=False)

    def _forget_pending(self, endpoint: str) -> None:
        self._pending.pop(endpoint, None)

    def _confirmed(self, endpoint: str, keys: Sequence[int]) -> None:
        pending = self._pending.get(endpoint)
        if pending:
            for key in keys:
                pending.pop(key, None)

    def drop(self, endpoint: str) -> None:
        self.fallback.drop(endpoint)
        self.state.drop(endpoint)  # also drops this endpoint's pending marks (on_forget)


def build_tokenizer(params: PrecisePrefixParams) -> PromptTokenizer:
    if params.tokenizer == "hf":
        if not params.tokenizer_json or not params.chat_template:
            raise ValueError("tokenizer 'hf' needs tokenizer_json and chat_template")
        with open(params.chat_template) as fh:
            template = fh.read()
        return HFTokenizer(params.tokenizer_json, template, special=params.special_tokens)
    return SimTokenizer(every=params.segment_chars)


def build_keyer(params: PrecisePrefixParams, tokenizer: PromptTokenizer | None = None) -> RequestKeyer:
    hasher = None
    mode: KeyMode = params.key_mode
    if mode == "engine":
        from simulator.vllm_hash import VllmBlockHasher

        if params.hash_seed is None and params.hash_algo.startswith("xxhash"):
            raise ValueError("engine key mode with an xxhash algorithm needs hash_seed: vLLM seeds it at random "
                             "otherwise, so no one else can compute its hashes")
        env = {} if params.hash_seed is None else {"PYTHONHASHSEED": params.hash_seed}
        hasher = VllmBlockHasher.create(params.hash_algo, env=env, lora_paths=params.lora_paths)
    return RequestKeyer(tokenizer or build_tokenizer(params), mode, engine_hasher=hasher, max_blocks=params.max_blocks)


def _build(name: str, params: PrecisePrefixParams, deps: BuildContext) -> PrefixCacheScorer:
    state = deps.kv_events if deps.kv_events is not None else KVEventState(params.key_mode, clock=deps.clock)
    if state.mode != params.key_mode:
        raise ValueError(f"key_mode '{params.key_mode}' differs from the gateway's kv_events.mode '{state.mode}'")
    fb = params.fallback

    def capacity_of(endpoint: str) -> int:
        if fb.lru_capacity_per_endpoint is not None:
            return fb.lru_capacity_per_endpoint
        m = deps.datastore.metrics_of(endpoint)
        if m is None or m.kv_capacity_tokens is None:
            return fb.fallback_capacity
        return int(m.kv_capacity_tokens * fb.bytes_per_token / fb.block_size)

    fallback = ApproxPrefixIndex(fb.block_size, fb.max_blocks, capacity_of)
    index = PreciseIndex(state, build_keyer(params), fallback, default_block_size=params.default_block_size,
                         cpu_weight=params.cpu_weight, pending_ttl_s=params.pending_ttl_s, clock=deps.clock,
                         exchange=state.pending)
    deps.datastore.add_restart_listener(index.drop)
    return PrefixCacheScorer(name, index, fb.block_size, fb.home_seen_capacity, deps.clock, fb.share_window_s)


FACTORY = PluginFactory(
    "precise-prefix-cache-scorer", "scorer", PrecisePrefixParams, _build,
    "fraction of the prompt cached, from the engines' KV events (approximate where there are none)",
)
