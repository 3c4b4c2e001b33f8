"""Scorer ``prefix-cache-scorer``: the fraction of the prompt's leading blocks believed cached on each endpoint.

A thin scorer over a :class:`~routing.prefix.PrefixIndex`; the approximate index is updated after the pick.
When no endpoint holds any of the prompt, it also names the prefix's *home* (rendezvous hash of the first
block), so a new or evicted prefix group keeps landing on the same replica instead of being copied to all.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.prefix import (
    ApproxPrefixIndex,
    PrefixIndex,
    block_hashes,
    endpoint_key,
    rendezvous,
    request_seed,
    stable_block_key,
)
from routing.types import EndpointView, PrefixMatch, RoutingRequest

__all__ = ["FACTORY", "PrefixCacheScorer", "PrefixParams"]


class PrefixParams(Params):
    block_size: int = Field(default=256, ge=8, description="bytes per hashed block (~64 tokens of English)")
    max_blocks: int = Field(default=512, ge=1, description="longest prompt prefix considered, in blocks")
    lru_capacity_per_endpoint: int | None = Field(
        default=None, ge=1, description="blocks remembered per endpoint; None derives it from the KV capacity"
    )
    bytes_per_token: float = Field(default=4.0, gt=0, description="to turn KV tokens into prompt bytes")
    fallback_capacity: int = Field(default=31_250, ge=1, description="blocks when the KV capacity is unknown")
    home_seen_capacity: int = Field(
        default=65_536, ge=0,
        description="first blocks remembered to tell a recurring prefix from a one-off prompt: only a prefix "
        "seen before (evicted, or a group that recurs) gets a home; 0 gives every uncached prompt a home",
    )
    evict_tail_first: bool = Field(
        default=True,
        description="the index forgets a prompt's last blocks before its first, as the engines evict; false "
        "(before version 2): first blocks first, so a prefix was forgotten whole once its first block aged out",
    )
    share_window_s: float = Field(
        default=10.0, gt=0,
        description="time constant of the decayed request counts behind PrefixMatch.share (the prefix's "
        "recent share of traffic, by first block); needs home_seen_capacity > 0",
    )
    track_free: bool = Field(
        default=False,
        description="report each endpoint's free share of its cache (1 - blocks remembered / capacity) in "
        "PrefixMatch.free, so cost scorers can see that a copy there evicts nothing",
    )
    group_depth: Literal["first-block", "deepest-seen"] = Field(
        default="first-block",
        description="what a prefix group is, for its home and its traffic share: the prompt's first block, or "
        "its deepest leading run of blocks (1, 2, 4, ... blocks) seen in earlier traffic, so documents under "
        "one system prompt are groups of their own; a group whose prefix is cached nowhere in full gets a home",
    )


class PrefixCacheScorer:
    def __init__(self, name: str, index: PrefixIndex, home_block_size: int = 256, seen_capacity: int = 0,
                 clock: Callable[[], float] | None = None, share_window_s: float = 10.0,
                 deep_groups: bool = False, capacity_of: Callable[[str], int] | None = None) -> None:
        self.name = name
        self._capacity_of = capacity_of
        self._deep = deep_groups
        self.index = index
        self._home_block = home_block_size
        self._keys: dict[str, int] = {}
        self._seen_capacity = seen_capacity
        # In-process block hash (the first block, or with deep groups each block at depth 1, 2, 4, ...) ->
        # [decayed request count, when it was last decayed], least recently seen first; with the total's
        # decayed count it gives each prefix's share of traffic.
        self._seen: OrderedDict[int, list[float]] = OrderedDict()
        self._clock = clock
        self._tau = share_window_s
        self._total = [0.0, 0.0]

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        names = [e.name for e in endpoints]
        scores = self.index.match(ctx.request, names)
        if self._deep:
            return self._score_deep(ctx, names, scores)
        # "Cached nowhere" means no endpoint holds even the first block: a chat template's few shared
        # tokens (an exact index sees those) must not disable the home.
        prompt_len = len(ctx.request.prompt)
        home = None
        seen = self._seen_entry(ctx.request)
        if names and prompt_len and max(scores) * prompt_len < self._home_block and (
                not self._seen_capacity or seen is not None):
            # A one-off prompt (no sharing) gains nothing from a home and loses load balance to it; a
            # prefix seen before is a group that recurs, and its home keeps the groups partitioned.
            home = self.home(ctx.request, names)
        # Producer role: cost-based scorers later in the profile, and the scheduler, read the match.
        ctx.prefix = PrefixMatch(dict(zip(names, scores, strict=True)), home, self._share(seen), self._free(names))
        return scores

    def _score_deep(self, ctx: CycleContext, names: list[str], scores: list[float]) -> list[float]:
        """Groups by the deepest leading run of blocks seen before (a document under a system prompt, not
        the system prompt): its share of traffic, and a home while no endpoint caches all of it."""
        req = ctx.request
        hashes = self._hashes(req)
        seen, depth = None, 0
        d = 1
        while d <= len(hashes):  # depths 1, 2, 4, ...: the deepest one seen wins
            entry = self._seen.get(hashes[d - 1])
            if entry is None:
                break
            seen, depth = entry, d
            d *= 2
        home = None
        if names and seen is not None and max(scores) * len(hashes) < depth - 0.5:
            key = self._group_key(req, depth)
            if key is not None:
                home = rendezvous(key, names, self._key)
        ctx.prefix = PrefixMatch(dict(zip(names, scores, strict=True)), home, self._share(seen), self._free(names))
        return scores

    def _group_key(self, req: RoutingRequest, depth: int) -> int | None:
        """A process-independent key of the group's first and last block (every gateway replica agrees)."""
        if depth <= 1:
            return stable_block_key(req.prompt, self._home_block, request_seed(req))
        b = self._home_block
        data = req.prompt
        blob = request_seed(req) + data[:b] + data[(depth - 1) * b: depth * b]
        return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")

    def _hashes(self, request: RoutingRequest) -> list[int]:
        index = self.index
        if isinstance(index, ApproxPrefixIndex) and index.block_size == self._home_block:
            return index.hashes(request)  # memoised by match()
        return block_hashes(request.prompt, self._home_block, request_seed(request), 512)

    def _free(self, names: Sequence[str]) -> dict[str, float]:
        capacity_of, index = self._capacity_of, self.index
        if capacity_of is None or not isinstance(index, ApproxPrefixIndex):
            return {}
        return {n: max(0.0, 1.0 - index.size(n) / max(1, capacity_of(n))) for n in names}

    def _share(self, seen: list[float] | None) -> float:
        if seen is None or self._clock is None or self._total[0] <= 0:
            return 0.0
        now = self._clock()
        mine = seen[0] * math.exp((seen[1] - now) / self._tau)
        total = self._total[0] * math.exp((self._total[1] - now) / self._tau)
        return min(1.0, mine / total) if total > 0 else 0.0

    def _bump(self, entry: list[float], now: float) -> None:
        entry[0] = entry[0] * math.exp((entry[1] - now) / self._tau) + 1.0
        entry[1] = now

    def home(self, request: RoutingRequest, names: Sequence[str]) -> str | None:
        """The endpoint that owns the prompt's first block; None for prompts shorter than a block.

        Keyed by a stable hash (not the index's per-process one) so every gateway replica agrees.
        """
        key = stable_block_key(request.prompt, self._home_block, request_seed(request))
        if key is None:
            return None
        return rendezvous(key, names, self._key)

    def _key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = endpoint_key(name)
        return key

    def _first_block(self, request: RoutingRequest) -> int | None:
        index = self.index
        if isinstance(index, ApproxPrefixIndex) and index.block_size == self._home_block:
            first = index.hashes(request)[:1]  # memoised by match(): no second hash on the hot path
        else:
            first = block_hashes(request.prompt, self._home_block, request_seed(request), 1)
        return first[0] if first else None

    def _seen_entry(self, request: RoutingRequest) -> list[float] | None:
        if not self._seen_capacity:
            return None
        first = self._first_block(request)
        return None if first is None else self._seen.get(first)

    def observe(self, request: RoutingRequest, endpoint: str) -> None:
        self.index.observe(request, endpoint)
        if not self._seen_capacity:
            return
        if self._deep:
            hashes = self._hashes(request)
            keys = [hashes[d - 1] for d in _depths(len(hashes))]
        else:
            first = self._first_block(request)
            keys = [] if first is None else [first]
        if not keys:
            return
        seen = self._seen
        now = self._clock() if self._clock is not None else None
        for key in keys:
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = [0.0, 0.0]
            else:
                seen.move_to_end(key)
            if now is not None:
                self._bump(entry, now)
        if now is not None:
            self._bump(self._total, now)
        while len(seen) > self._seen_capacity:
            seen.popitem(last=False)


def _depths(n: int) -> list[int]:
    out, d = [], 1
    while d <= n:
        out.append(d)
        d *= 2
    return out


def _build(name: str, params: PrefixParams, deps: BuildContext) -> PrefixCacheScorer:
    fixed = params.lru_capacity_per_endpoint

    def capacity_of(endpoint: str) -> int:
        if fixed is not None:
            return fixed
        m = deps.datastore.metrics_of(endpoint)
        if m is None or m.kv_capacity_tokens is None:
            return params.fallback_capacity
        return int(m.kv_capacity_tokens * params.bytes_per_token / params.block_size)

    index = ApproxPrefixIndex(params.block_size, params.max_blocks, capacity_of, params.evict_tail_first)
    deps.datastore.add_restart_listener(index.drop)
    return PrefixCacheScorer(name, index, params.block_size, params.home_seen_capacity, deps.clock,
                             params.share_window_s, params.group_depth == "deepest-seen",
                             capacity_of if params.track_free else None)


FACTORY = PluginFactory(
    "prefix-cache-scorer", "scorer", PrefixParams, _build, "fraction of the prompt cached (approximate)",
    version=2,  # 2: evict_tail_first on by default
)
