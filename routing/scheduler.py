"""The scheduler: filters, weighted scorers and a picker run over a datastore snapshot.

Pure and synchronous, so the proxy, the ext_proc sidecar and the virtual-time evaluator share it.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from routing.config import RoutingConfig, resolve
from routing.datastore import Datastore
from routing.errors import ModelNotServed, NoHealthyEndpoint, UnknownProfile
from routing.plugins.base import BuildContext, CycleContext, Filter, Observer, Picker, Scorer
from routing.plugins.prefill_cost import PREFIX_MATCH_KEY
from routing.plugins.registry import Registry, default_registry
from routing.types import Candidate, Decision, RoutingRequest

__all__ = ["Profile", "Scheduler", "build_scheduler"]


@dataclass(frozen=True)
class Profile:
    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    observers: tuple[Observer, ...]


class Scheduler:
    """Turns a :class:`RoutingRequest` into a ranked :class:`Decision`; never mutates the datastore."""

    def __init__(
        self,
        datastore: Datastore,
        profiles: dict[str, Profile],
        default_profile: str,
        *,
        rng: random.Random,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._ds = datastore
        self._profiles = profiles
        self._default = default_profile
        self._rng = rng
        self._timer = timer

    @property
    def profiles(self) -> list[str]:
        return list(self._profiles)

    def _profile(self, name: str | None) -> Profile:
        profile = self._profiles.get(name or self._default)
        if profile is None:
            raise UnknownProfile(name or self._default)
        return profile

    def schedule(self, req: RoutingRequest) -> Decision:
        timer = self._timer
        started = timer()
        profile = self._profile(req.profile)
        snapshot = self._ds.snapshot()
        endpoints = [e for e in snapshot if e.serves(req.model)]
        if not endpoints:
            raise ModelNotServed(req.model)
        ctx = CycleContext(request=req, snapshot=snapshot, rng=self._rng)
        timings: dict[str, float] = {}
        for f in profile.filters:
            t = timer()
            endpoints = f.filter(ctx, endpoints)
            timings[f.name] = timer() - t
            if not endpoints:
                raise NoHealthyEndpoint(req.model, f"every endpoint removed by filter '{f.name}'")
        candidates = [Candidate(endpoint=e.name, url=e.url, score=0.0) for e in endpoints]
        if len(candidates) == 1:
            # Nothing to rank: skip the scorers and the picker. Without the prefix match the whole
            # prompt counts as uncached, which only overstates this endpoint's in-flight prefill.
            only = candidates[0]
            only.uncached_tokens = req.prompt_tokens
            return Decision(model=req.model, profile=profile.name, ranked=candidates,
                            latency_s=timer() - started, timings=timings)
        for scorer, weight in profile.scorers:
            t = timer()
            raw = scorer.score(ctx, endpoints)
            timings[scorer.name] = timer() - t
            name = scorer.name
            for cand, value in zip(candidates, raw, strict=True):
                if not 0.0 <= value <= 1.0:  # also catches NaN
                    value = _clamp(value)
                cand.scores[name] = value
                cand.score += weight * value
        matched: dict[str, float] = ctx.scratch.get(PREFIX_MATCH_KEY, {})
        for cand in candidates:
            cand.uncached_tokens = round((1.0 - matched.get(cand.endpoint, 0.0)) * req.prompt_tokens)
        t = timer()
        ranked = profile.picker.pick(ctx, candidates)
        timings[profile.picker.name] = timer() - t
        return Decision(
            model=req.model,
            profile=profile.name,
            ranked=ranked,
            latency_s=timer() - started,
            timings=timings,
        )

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        """Tell stateful plugins where the request went (call once, after the pick is final)."""
        for obs in self._profile(req.profile).observers:
            obs.observe(req, endpoint)


def _clamp(value: float) -> float:
    # A misbehaving scorer (NaN, out of range) must not dominate the sum.
    if math.isnan(value):
        return 0.0
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else float(value)


def build_scheduler(
    cfg: RoutingConfig,
    datastore: Datastore,
    *,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    registry: Registry | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> Scheduler:
    """Instantiate every referenced plugin once (profiles share instances, hence state) and wire profiles."""
    registry = registry or default_registry()
    rng = rng or random.Random()
    deps = BuildContext(datastore=datastore, rng=rng, clock=clock)
    instances: dict[str, object] = {}

    def instance(ref: str) -> object:
        found = resolve(cfg, registry, ref)
        if found is None:  # config validation rejects this; guard for hand-built configs
            raise ValueError(f"unknown plugin '{ref}'")
        factory, spec = found
        if spec.key not in instances:
            instances[spec.key] = factory.build(spec.key, factory.params.model_validate(spec.params), deps)
        return instances[spec.key]

    profiles: dict[str, Profile] = {}
    for p in cfg.profiles:
        filters = tuple(instance(ref) for ref in p.filters)
        scorers = tuple((instance(r.ref), r.weight) for r in p.plugins)
        picker = instance(p.picker)
        members: list[object] = [*filters, *(s for s, _ in scorers), picker]
        observers: list[Observer] = []
        for m in members:
            if isinstance(m, Observer) and m not in observers:
                observers.append(m)
        profiles[p.name] = Profile(
            name=p.name,
            filters=filters,  # type: ignore[arg-type]
            scorers=scorers,  # type: ignore[arg-type]
            picker=picker,  # type: ignore[arg-type]
            observers=tuple(observers),
        )
    default = cfg.default_profile or cfg.profiles[0].name
    return Scheduler(datastore, profiles, default, rng=rng, timer=timer)
