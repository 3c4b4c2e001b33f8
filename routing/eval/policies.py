"""Named policies for the evaluator: the default profile, the baselines and the oracle, as routing configs.
"""
from __future__ import annotations

from typing import Any

from routing.config import RoutingConfig
from routing.plugins.registry import Registry

__all__ = ["POLICIES", "policy_config"]


POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "round-robin": {"profiles": [{"name": "round-robin", "picker": "round-robin"}]},
    "random": {"profiles": [{"name": "random", "picker": "random"}]},
    "least-request": {"profiles": [{"name": "least-request", "plugins": [{"ref": "least-request-scorer"}]}]},
    "cache-aware": {"profiles": [{"name": "cache-aware", "picker": "cache-aware"}]},
    "oracle": {},  # built from the defaults in policy_config
}


def policy_config(name: str, registry: Registry) -> RoutingConfig:
    try:
        data = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy '{name}'; choose from {', '.join(POLICIES)}") from None
    if name == "oracle":
        # The default profile with the approximate prefix index swapped for the engines' true state.
        defaults = RoutingConfig()
        plugins = [
            {"type": "oracle-prefix-scorer", "name": "prefix"} if p.type == "prefix-cache-scorer" else p.model_dump()
            for p in defaults.plugins
        ]
        profile = defaults.profile(None)
        assert profile is not None
        data = {"plugins": plugins, "profiles": [{**profile.model_dump(), "name": "oracle"}]}
    return RoutingConfig.model_validate(data, context={"registry": registry})
