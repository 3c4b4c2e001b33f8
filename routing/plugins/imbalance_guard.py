"""Picker ``imbalance-guard``: max-score, except when the fleet is imbalanced beyond thresholds, then the
least-loaded endpoint first (SGLang ``cache_aware``'s switch, as a guard around the default's scores).

Imbalanced: ``max - min > abs_threshold`` and ``max > rel_threshold x min`` over the candidates' load,
where load is gateway in-flight requests (cache_aware's measure) or, with ``load: predicted``, the
predicted time to first token (``CycleContext.latency``, from ``predicted-latency-scorer``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.plugins.max_score import rank_by_score
from routing.types import Candidate

__all__ = ["FACTORY", "ImbalanceGuardParams", "ImbalanceGuardPicker"]


class ImbalanceGuardParams(Params):
    load: Literal["requests", "predicted"] = "requests"
    abs_threshold: float = Field(default=8.0, ge=0, description="requests, or seconds with load: predicted")
    rel_threshold: float = Field(default=1.5, ge=1)


class ImbalanceGuardPicker:
    def __init__(self, name: str, params: ImbalanceGuardParams) -> None:
        self.name = name
        self._p = params

    def _loads(self, ctx: CycleContext, candidates: list[Candidate]) -> dict[str, float] | None:
        if self._p.load == "predicted":
            latency = ctx.latency
            if latency is None:
                return None  # no predictor in this profile: the guard cannot judge, scores decide
            return {c.endpoint: latency.ttft_s.get(c.endpoint, 0.0) for c in candidates}
        views = ctx.snapshot.endpoints
        return {c.endpoint: float(views[c.endpoint].inflight_requests) for c in candidates}

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        ranked = rank_by_score(ctx, candidates)
        loads = self._loads(ctx, candidates)
        if not loads:
            return ranked
        lo, hi = min(loads.values()), max(loads.values())
        p = self._p
        if hi - lo > p.abs_threshold and hi > lo * p.rel_threshold:
            # Least loaded first; among equals, the better score (the ranked order is the tie-break).
            order = {c.endpoint: i for i, c in enumerate(ranked)}
            return sorted(ranked, key=lambda c: (loads[c.endpoint], order[c.endpoint]))
        return ranked


def _build(name: str, params: ImbalanceGuardParams, deps: BuildContext) -> ImbalanceGuardPicker:
    return ImbalanceGuardPicker(name, params)


FACTORY = PluginFactory("imbalance-guard", "picker", ImbalanceGuardParams, _build,
                        "max-score unless imbalanced beyond thresholds, then least loaded")
