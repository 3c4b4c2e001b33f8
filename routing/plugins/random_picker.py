"""Picker ``random`` (baseline): a uniformly random order, ignoring scores.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import Candidate

__all__ = ["FACTORY", "RandomPicker"]


class RandomPicker:
    def __init__(self, name: str) -> None:
        self.name = name

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        out = list(candidates)
        ctx.rng.shuffle(out)
        return out


def _build(name: str, params: NoParams, deps: BuildContext) -> RandomPicker:
    return RandomPicker(name)


FACTORY = PluginFactory("random", "picker", NoParams, _build, "uniformly random")
