"""Picker ``weighted-random``: choose among the top ``k`` with probability proportional to score.

Softens max-score's herd behaviour when several gateways see the same stale metrics.
"""
from __future__ import annotations

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.plugins.max_score import rank_by_score
from routing.types import Candidate

__all__ = ["FACTORY", "WeightedRandomParams", "WeightedRandomPicker"]


class WeightedRandomParams(Params):
    k: int = Field(default=3, ge=1)
    floor: float = Field(default=1e-3, gt=0, description="weight given to a zero score")


class WeightedRandomPicker:
    def __init__(self, name: str, params: WeightedRandomParams) -> None:
        self.name = name
        self._p = params

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        ranked = rank_by_score(ctx, candidates)
        top = ranked[: self._p.k]
        weights = [max(c.score, self._p.floor) for c in top]
        chosen = ctx.rng.choices(range(len(top)), weights=weights)[0]
        return [top[chosen], *(c for i, c in enumerate(ranked) if i != chosen)]


def _build(name: str, params: WeightedRandomParams, deps: BuildContext) -> WeightedRandomPicker:
    return WeightedRandomPicker(name, params)


FACTORY = PluginFactory("weighted-random", "picker", WeightedRandomParams, _build, "score-weighted among top k")
