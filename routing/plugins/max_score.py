"""Picker ``max-score``: rank by total score, ties broken at random (default) or by the request's content.

``tie_break: content`` ranks tied candidates by a rendezvous hash of the request (model, adapter,
salt and prompt) and the endpoint name, so gateway replicas with the same view pick the same one.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.prefix import _mix, endpoint_key, request_seed
from routing.types import Candidate, RoutingRequest

__all__ = ["FACTORY", "MaxScoreParams", "MaxScorePicker", "content_key", "rank_by_score"]


class MaxScoreParams(Params):
    tie_break: Literal["random", "content"] = "random"


def rank_by_score(ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
    # A random secondary key breaks ties uniformly; cheaper than a shuffle then a stable sort.
    draw = ctx.rng.random
    return sorted(candidates, key=lambda c: (-c.score, draw()))


def content_key(req: RoutingRequest) -> int:
    """A process-independent 64-bit key of the request's content (head and tail of the prompt, its length)."""
    p = req.prompt
    data = request_seed(req) + b"\x00" + len(p).to_bytes(8, "little") + p[:2048] + p[-2048:]
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class MaxScorePicker:
    def __init__(self, name: str, tie_break: str = "random") -> None:
        self.name = name
        self.tie_break = tie_break
        self._keys: dict[str, int] = {}

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        if self.tie_break != "content":
            return rank_by_score(ctx, candidates)
        key = content_key(ctx.request)
        keys = self._keys
        for c in candidates:
            if c.endpoint not in keys:
                keys[c.endpoint] = endpoint_key(c.endpoint)
        return sorted(candidates, key=lambda c: (-c.score, -_mix(key ^ keys[c.endpoint])))


def _build(name: str, params: MaxScoreParams, deps: BuildContext) -> MaxScorePicker:
    return MaxScorePicker(name, params.tie_break)


FACTORY = PluginFactory("max-score", "picker", MaxScoreParams, _build,
                        "highest total score; ties at random or by request content (replicas agree)")
