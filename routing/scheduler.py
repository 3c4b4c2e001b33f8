"""The scheduler: filters, weighted scorers and a picker run over a datastore snapshot.

Pure and synchronous, so the proxy, the ext_proc sidecar and the virtual-time evaluator share it.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from routing.config import ProfileRule, RoutingConfig, resolve
from routing.datastore import Datastore
from routing.errors import ModelNotServed, NoHealthyEndpoint
from routing.kv.state import KVEventState
from routing.plugins.base import BuildContext, CycleContext, Filter, Observer, Picker, Scorer
from routing.plugins.registry import Registry, default_registry
from routing.profiles import ProfileSelector
from routing.types import Candidate, Decision, RoutingRequest, ScoreTable

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
        rules: Sequence[ProfileRule] = (),
    ) -> None:
        self._ds = datastore
        self._profiles = profiles
        self._selector = ProfileSelector(profiles, default_profile, rules)
        self._rng = rng
        self._timer = timer
        self._weights = {name: tuple((s.name, w) for s, w in p.scorers) for name, p in profiles.items()}

    @property
    def profiles(self) -> list[str]:
        return list(self._profiles)

    def select_profile(self, req: RoutingRequest) -> str:
        """The profile ``req`` runs: the one it names (the caller authorised it), else the first matching
        ``profile_rules`` entry, else the default; raises UnknownProfile for a name not configured."""
        return self._selector.select(req)

    def _profile(self, req: RoutingRequest) -> Profile:
        return self._profiles[self._selector.select(req)]

    def schedule(self, req: RoutingRequest) -> Decision:
        timer = self._timer
        started = timer()
        profile = self._profile(req)
        snapshot = self._ds.snapshot()
        model = req.model
        endpoints = [e for e in snapshot if e.serves(model)]
        if not endpoints:
            raise ModelNotServed(model)
        if req.eligible is not None:
            # The data plane may narrow the pick (ext_proc subset hint); none left is a 503, not a 404.
            endpoints = [e for e in endpoints if e.name in req.eligible]
            if not endpoints:
                raise NoHealthyEndpoint(model, "no endpoint of the request's subset serves it")
        ctx = CycleContext(request=req, snapshot=snapshot, rng=self._rng)
        timings: dict[str, float] = {}
        # One clock read per plugin: each call is timed from the end of the previous one.
        t = timer()
        for f in profile.filters:
            endpoints = f.filter(ctx, endpoints)
            now = timer()
            timings[f.name] = now - t
            if not endpoints:
                raise NoHealthyEndpoint(model, f"every endpoint removed by filter '{f.name}'")
            t = now
        if len(endpoints) == 1:
            # Nothing to rank: skip the scorers and the picker. Without the prefix match the whole
            # prompt counts as uncached, which only overstates this endpoint's in-flight prefill.
            only = endpoints[0]
            ranked = [Candidate(only.name, only.url, 0.0, None, req.prompt_tokens)]
            return Decision(model=model, profile=profile.name, ranked=ranked,
                            latency_s=timer() - started, timings=timings)
        columns: list[Sequence[float]] = []
        t = timer()
        for scorer, _ in profile.scorers:
            columns.append(scorer.score(ctx, endpoints))
            now = timer()
            timings[scorer.name] = now - t
            t = now
        matched = ctx.prefix.cached if ctx.prefix is not None else {}
        prompt_tokens = req.prompt_tokens
        table = ScoreTable(endpoints)
        candidates = [
            Candidate(e.name, e.url, 0.0, table, round((1.0 - matched.get(e.name, 0.0)) * prompt_tokens))
            for e in endpoints
        ]
        for (scorer, weight), column in zip(profile.scorers, columns, strict=True):
            column = _clamped(scorer.name, column, len(candidates))
            table.add(scorer.name, column)
            if weight < math.inf and not any(column):
                continue  # every score 0: adding weight * 0.0 leaves each total bit-for-bit unchanged
            for cand, value in zip(candidates, column, strict=True):
                cand.score += weight * value
        t = timer()
        ranked = profile.picker.pick(ctx, candidates)
        now = timer()
        timings[profile.picker.name] = now - t
        return Decision(
            model=model,
            profile=profile.name,
            ranked=ranked,
            latency_s=now - started,
            timings=timings,
            prefix=ctx.prefix,
            weights=self._weights[profile.name],
        )

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        """Tell stateful plugins where the request went (call once, after the pick is final)."""
        for obs in self._profile(req).observers:
            obs.observe(req, endpoint)


def _clamped(name: str, scores: Sequence[float], n: int) -> Sequence[float]:
    """The scorer's scores, with any outside [0, 1] (or NaN) clamped; the same list when all are fine."""
    if len(scores) != n:
        raise ValueError(f"scorer '{name}' returned {len(scores)} scores for {n} endpoints")
    for value in scores:
        if not 0.0 <= value <= 1.0:  # also catches NaN
            return [v if 0.0 <= v <= 1.0 else _clamp(v) for v in scores]
    return scores


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
    kv_events: KVEventState | None = None,
) -> Scheduler:
    """Instantiate every referenced plugin once (profiles share instances, hence state) and wire profiles."""
    registry = registry or default_registry()
    rng = rng or random.Random()
    deps = BuildContext(datastore=datastore, rng=rng, clock=clock, kv_events=kv_events)
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
    return Scheduler(datastore, profiles, default, rng=rng, timer=timer, rules=cfg.profile_rules)
