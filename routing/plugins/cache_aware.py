"""Picker ``cache-aware`` (baseline): a reimplementation of SGLang/vllm-router's cache_aware policy.

Balanced load: the worker with the longest prefix match if it covers > cache_threshold of the
prompt, else the worker with the smallest tree. Imbalanced (max - min > abs and max > rel * min):
the least-loaded worker. The radix tree is approximated by fine-grained chained byte-block hashes.
`low_match` calibrates it to vllm-router's binary (docs/benchmarks.md, head-to-head calibration).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.prefix import ApproxPrefixIndex
from routing.types import Candidate, RoutingRequest

__all__ = ["FACTORY", "CacheAwareParams", "CacheAwarePicker"]


class CacheAwareParams(Params):
    balance_abs_threshold: int = Field(default=64, ge=0)
    balance_rel_threshold: float = Field(default=1.5, ge=1)
    cache_threshold: float = Field(default=0.3, ge=0, le=1)
    block_size: int = Field(default=16, ge=1, description="bytes per tree step; SGLang's tree is per character")
    max_tree_size: int = Field(default=2**26, ge=1, description="characters kept per worker, as in SGLang")
    low_match: Literal["smallest-tree", "least-load"] = Field(
        default="smallest-tree",
        description="where a request below cache_threshold goes: the worker with the smallest tree "
                    "(SGLang), or the one with the fewest in-flight requests (vllm-router 0.1.17's "
                    "prefix_miss path)")


class CacheAwarePicker:
    def __init__(self, name: str, params: CacheAwareParams) -> None:
        self.name = name
        self._p = params
        capacity = max(1, params.max_tree_size // params.block_size)
        # SGLang indexes the whole text; the cap only bounds pathological prompts.
        self._tree = ApproxPrefixIndex(params.block_size, 1 << 20, lambda _e: capacity)

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        views = ctx.snapshot.endpoints
        load = {c.endpoint: views[c.endpoint].inflight_requests for c in candidates}
        by_load = sorted(candidates, key=lambda c: (load[c.endpoint], c.endpoint))
        hi, lo = load[by_load[-1].endpoint], load[by_load[0].endpoint]
        p = self._p
        if hi - lo > p.balance_abs_threshold and hi > lo * p.balance_rel_threshold:
            chosen = by_load[0]
        else:
            chosen = self._by_cache(ctx.request, candidates, by_load[0])
        return [chosen, *(c for c in by_load if c is not chosen)]

    def _by_cache(self, req: RoutingRequest, candidates: list[Candidate], least_loaded: Candidate) -> Candidate:
        hashes = self._tree.hashes(req)
        matched = self._tree.matched_blocks(hashes)
        best = max(
            (c for c in candidates if c.endpoint in matched),
            key=lambda c: (matched[c.endpoint], c.endpoint),
            default=None,
        )
        if best is not None and hashes and matched[best.endpoint] / len(hashes) > self._p.cache_threshold:
            return best
        if self._p.low_match == "least-load":
            return least_loaded
        return min(candidates, key=lambda c: (self._tree.size(c.endpoint), c.endpoint))

    def observe(self, request: RoutingRequest, endpoint: str) -> None:
        self._tree.observe(request, endpoint)

    def drop(self, endpoint: str) -> None:
        self._tree.drop(endpoint)


def _build(name: str, params: CacheAwareParams, deps: BuildContext) -> CacheAwarePicker:
    picker = CacheAwarePicker(name, params)
    deps.datastore.add_restart_listener(picker.drop)
    return picker


FACTORY = PluginFactory("cache-aware", "picker", CacheAwareParams, _build, "SGLang cache_aware baseline")
