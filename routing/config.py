"""The ``routing:`` section of Gravity's configuration, as validated pydantic value objects.

Errors name the offending path (``routing.profiles[0].plugins[2].ref: unknown plugin 'x'``) and each
plugin validates its own ``params`` through the model its factory declares.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from routing.plugins.base import PluginFactory
from routing.plugins.registry import Registry, default_registry

__all__ = [
    "DEFAULT_FILTERS",
    "PluginSpec",
    "ProfilePluginRef",
    "ProfileRule",
    "ProfileSpec",
    "RoutingConfig",
    "load_routing_config",
    "resolve",
]

DEFAULT_FILTERS = ("model-served", "healthy", "lora-capable")


class PluginSpec(BaseModel):
    """One plugin instance: ``type`` picks the implementation, ``name`` is how profiles refer to it."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name or self.type


class ProfilePluginRef(BaseModel):
    """A scorer in a profile and its weight; the scheduler multiplies the clamped score by it."""

    model_config = ConfigDict(extra="forbid")

    ref: str
    weight: float = Field(default=1.0, ge=0)


def _default_plugins() -> list[PluginSpec]:
    # Tuned with the evaluator (docs/routing.md); config/routing.yaml spells the same thing out.
    return [
        PluginSpec(type="prefix-cache-scorer", name="prefix"),
        PluginSpec(type="queue-scorer", name="queue"),
        PluginSpec(type="prefill-cost-scorer", name="prefill-cost"),
        PluginSpec(type="kv-cache-utilization-scorer", name="kv-cache"),
        PluginSpec(type="session-affinity-scorer", name="session"),
        PluginSpec(type="lora-affinity-scorer", name="lora"),
        PluginSpec(type="load-guard-scorer", name="load-guard"),
    ]


class ProfileSpec(BaseModel):
    """A named scheduling recipe: filters in order, weighted scorers, one picker."""

    model_config = ConfigDict(extra="forbid")

    name: str
    plugins: list[ProfilePluginRef] = Field(default_factory=list)
    picker: str = "max-score"
    filters: list[str] = Field(default_factory=lambda: list(DEFAULT_FILTERS))


# prefill-cost carries load and cache misses in one unit (tokens); prefix adds a tie-breaking pull
# toward warm caches; load-guard caps pile-ups on hot prefixes. Tuned in docs/routing.md.
DEFAULT_WEIGHTS = {"prefix": 2.0, "prefill-cost": 4.0, "load-guard": 2.0, "session": 1.0, "lora": 1.0}


def _default_profiles() -> list[ProfileSpec]:
    refs = [ProfilePluginRef(ref=name, weight=w) for name, w in DEFAULT_WEIGHTS.items()]
    return [ProfileSpec(name="default", plugins=refs)]


class ProfileRule(BaseModel):
    """Run ``profile`` for requests matching every condition given (first matching rule wins).

    A profile the caller names on the request (``RoutingRequest.profile``) takes precedence over rules.
    """

    model_config = ConfigDict(extra="forbid")

    profile: str
    model: str | None = Field(default=None, description="glob on the requested model or LoRA adapter name, e.g. 'llama-70b*'")
    lora: bool | None = Field(default=None, description="true: requests naming a LoRA adapter; false: base model")
    priority: str | None = Field(default=None, description="the request's priority class, e.g. 'batch'")


class RoutingConfig(BaseModel):
    """Scheduler plugins and profiles plus the metrics collector's timing."""

    model_config = ConfigDict(extra="forbid")

    plugins: list[PluginSpec] = Field(default_factory=_default_plugins)
    profiles: list[ProfileSpec] = Field(default_factory=_default_profiles, min_length=1)
    default_profile: str | None = None  # None: the first profile
    profile_rules: list[ProfileRule] = Field(default_factory=list)
    scrape_interval_s: float = Field(default=0.1, gt=0)
    scrape_timeout_s: float = Field(default=0.5, gt=0)
    stale_after_s: float = Field(default=2.0, gt=0)
    # Consecutive failed scrapes before an endpoint is marked unhealthy; a refused connection is
    # immediate. One slow scrape on a loaded host must not turn into 503s.
    unhealthy_after_failures: int = Field(default=3, ge=1)
    session_from_user: bool = False  # fall back to the body's `user` when x-session-id is absent

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> RoutingConfig:
        ctx = info.context if isinstance(info.context, dict) else {}
        registry = ctx.get("registry") or default_registry()
        problems = _problems(self, registry)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def profile(self, name: str | None) -> ProfileSpec | None:
        wanted = name or self.default_profile or self.profiles[0].name
        return next((p for p in self.profiles if p.name == wanted), None)


def resolve(cfg: RoutingConfig, registry: Registry, ref: str) -> tuple[PluginFactory, PluginSpec] | None:
    """A reference names a configured plugin, or else a registered type used with default params."""
    for spec in cfg.plugins:
        if spec.key == ref:
            factory = registry.get(spec.type)
            return None if factory is None else (factory, spec)
    factory = registry.get(ref)
    return None if factory is None else (factory, PluginSpec(type=ref))


def _problems(cfg: RoutingConfig, registry: Registry) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for i, spec in enumerate(cfg.plugins):
        path = f"routing.plugins[{i}]"
        if spec.key in seen:
            out.append(f"{path}.name: duplicate plugin name '{spec.key}'")
        seen.add(spec.key)
        factory = registry.get(spec.type)
        if factory is None:
            out.append(f"{path}.type: unknown plugin type '{spec.type}' (known: {', '.join(registry.types())})")
            continue
        try:
            factory.params.model_validate(spec.params)
        except ValidationError as exc:
            for err in exc.errors():
                loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                out.append(f"{path}.params{loc}: {err['msg']}")
    names = [p.name for p in cfg.profiles]
    for i, profile in enumerate(cfg.profiles):
        path = f"routing.profiles[{i}]"
        if names.count(profile.name) > 1:
            out.append(f"{path}.name: duplicate profile name '{profile.name}'")
        for j, ref in enumerate(profile.plugins):
            out.extend(_check_ref(cfg, registry, ref.ref, "scorer", f"{path}.plugins[{j}].ref"))
        for j, ref_name in enumerate(profile.filters):
            out.extend(_check_ref(cfg, registry, ref_name, "filter", f"{path}.filters[{j}]"))
        out.extend(_check_ref(cfg, registry, profile.picker, "picker", f"{path}.picker"))
    if cfg.default_profile is not None and cfg.default_profile not in names:
        out.append(f"routing.default_profile: unknown profile '{cfg.default_profile}'")
    for i, rule in enumerate(cfg.profile_rules):
        if rule.profile not in names:
            out.append(f"routing.profile_rules[{i}].profile: unknown profile '{rule.profile}'")
    return out


def _check_ref(cfg: RoutingConfig, registry: Registry, ref: str, kind: str, path: str) -> list[str]:
    found = resolve(cfg, registry, ref)
    if found is None:
        return [f"{path}: unknown plugin '{ref}'"]
    factory, _ = found
    if factory.kind != kind:
        return [f"{path}: '{ref}' is a {factory.kind}, not a {kind}"]
    return []


def load_routing_config(path: str | Path, registry: Registry | None = None) -> RoutingConfig:
    """Read a YAML file holding either a bare routing section or a full config with a ``routing:`` key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict) and "routing" in data:
        data = data["routing"] or {}
    return RoutingConfig.model_validate(data, context={"registry": registry or default_registry()})
