"""Picker ``max-score``: rank by total score, breaking ties at random so equal replicas share load.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import Candidate

__all__ = ["FACTORY", "MaxScorePicker", "rank_by_score"]


def rank_by_score(ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
    # A random secondary key breaks ties uniformly; cheaper than a shuffle then a stable sort.
    draw = ctx.rng.random
    return sorted(candidates, key=lambda c: (-c.score, draw()))


class MaxScorePicker:
    def __init__(self, name: str) -> None:
        self.name = name

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        return rank_by_score(ctx, candidates)


def _build(name: str, params: NoParams, deps: BuildContext) -> MaxScorePicker:
    return MaxScorePicker(name)


FACTORY = PluginFactory("max-score", "picker", NoParams, _build, "highest total score, random tie-break")
