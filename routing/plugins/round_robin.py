"""Picker ``round-robin`` (baseline): endpoints in name order, starting one further on each call.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import Candidate

__all__ = ["FACTORY", "RoundRobinPicker"]


class RoundRobinPicker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._cursor = 0

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        ordered = sorted(candidates, key=lambda c: c.endpoint)
        start = self._cursor % len(ordered) if ordered else 0
        self._cursor += 1
        return ordered[start:] + ordered[:start]


def _build(name: str, params: NoParams, deps: BuildContext) -> RoundRobinPicker:
    return RoundRobinPicker(name)


FACTORY = PluginFactory("round-robin", "picker", NoParams, _build, "rotate through endpoints")
