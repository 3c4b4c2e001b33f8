"""Picker ``power-of-two``: sample two candidates at random and take the better one.

Near least-loaded balance with little herding; the rest follow by score for retries.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.plugins.max_score import rank_by_score
from routing.types import Candidate

__all__ = ["FACTORY", "PowerOfTwoPicker"]


class PowerOfTwoPicker:
    def __init__(self, name: str) -> None:
        self.name = name

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        a, b = ctx.rng.sample(candidates, 2)
        best = a if a.score >= b.score else b
        return [best, *(c for c in rank_by_score(ctx, candidates) if c is not best)]


def _build(name: str, params: NoParams, deps: BuildContext) -> PowerOfTwoPicker:
    return PowerOfTwoPicker(name)


FACTORY = PluginFactory("power-of-two", "picker", NoParams, _build, "better of two random candidates")
