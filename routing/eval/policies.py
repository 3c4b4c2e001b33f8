"""Named policies for the evaluator: the default profile, the baselines and the oracle, as routing configs.
"""
from __future__ import annotations

from typing import Any

from routing.config import RoutingConfig
from routing.plugins.registry import Registry

__all__ = ["KV_FEED_POLICIES", "POLICIES", "policy_config"]


POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "round-robin": {"profiles": [{"name": "round-robin", "picker": "round-robin"}]},
    "random": {"profiles": [{"name": "random", "picker": "random"}]},
    "least-request": {"profiles": [{"name": "least-request", "plugins": [{"ref": "least-request-scorer"}]}]},
    "cache-aware": {"profiles": [{"name": "cache-aware", "picker": "cache-aware"}]},
    # cache_aware calibrated to vllm-router's binary: a low match goes to the least-loaded worker, not the
    # smallest tree (docs/benchmarks.md, head-to-head calibration).
    "cache-aware-ll": {"plugins": [{"type": "cache-aware", "name": "cache-aware-ll", "params": {"low_match": "least-load"}}],
                       "profiles": [{"name": "cache-aware-ll", "picker": "cache-aware-ll"}]},
    "oracle": {},  # built from the defaults in policy_config
    # The default profile with the prefix scorer fed by the engines' KV events (routing/eval/kv_feed.py):
    # keyed by the gateway's hash of token ids, or by the engines' own block hashes.
    "precise": {},
    "precise-engine": {},
}

# Candidate variants of the default profile, measured with the sweep (docs/routing.md): name ->
# (replace prefill-cost by predicted-latency, params merged into the cost scorer, picker spec or None).
CANDIDATES: dict[str, tuple[bool, dict[str, Any], dict[str, Any] | None]] = {
    # The default before the sweep's tuning (prefill-cost and prefix-cache-scorer version 1): no hot-prefix
    # replication, no waiting floor, and the prefix index forgets a prompt's first blocks first.
    "previous": (False, {"hot_replication": False, "waiting_floor_tokens": 0.0}, None),
    "hot": (False, {"hot_replication": True}, None),
    "guard": (False, {}, {"type": "imbalance-guard", "params": {"abs_threshold": 8, "rel_threshold": 1.5}}),
    "pl": (True, {}, None),
    "pl-hot": (True, {"hot_replication": True}, None),
    "pl-guard": (True, {}, {"type": "imbalance-guard", "params": {"load": "predicted", "abs_threshold": 1.0,
                                                                  "rel_threshold": 1.5}}),
    "pl-hot-guard": (True, {"hot_replication": True}, {"type": "imbalance-guard", "params": {
        "load": "predicted", "abs_threshold": 1.0, "rel_threshold": 1.5}}),
}
# Params merged into the prefix scorer's, per candidate (the others keep the default's).
CANDIDATE_PREFIX: dict[str, dict[str, Any]] = {
    "previous": {"evict_tail_first": False},
    "deep": {"group_depth": "deepest-seen"},
}
CANDIDATES["deep"] = (False, {"home_miss_exempt": True}, None)
CANDIDATES["deep-share"] = (False, {}, None)  # deep groups for the traffic share and home, no exemption
CANDIDATE_PREFIX["deep-share"] = {"group_depth": "deepest-seen"}
CANDIDATES["free"] = (False, {}, None)  # a copy into free cache pays no extra miss weight
CANDIDATE_PREFIX["free"] = {"track_free": True}
CANDIDATES["free-deep"] = (False, {}, None)
CANDIDATES["pressure-deep"] = (False, {"free_needs_pressure": True}, None)  # free cache discounted by the holder's fullness
CANDIDATE_PREFIX["pressure-deep"] = {"track_free": True, "group_depth": "deepest-seen"}
CANDIDATE_PREFIX["free-deep"] = {"track_free": True, "group_depth": "deepest-seen"}
POLICIES.update({name: {} for name in CANDIDATES})


def _candidate(name: str, registry: Registry) -> RoutingConfig:
    predicted, params, picker = CANDIDATES[name]
    defaults = RoutingConfig()
    profile = defaults.profile(None)
    assert profile is not None
    plugins = []
    for spec in defaults.plugins:
        data = spec.model_dump()
        if spec.type == "prefix-cache-scorer" and name in CANDIDATE_PREFIX:
            data["params"] = {**data["params"], **CANDIDATE_PREFIX[name]}
        if spec.type == "prefill-cost-scorer":
            if predicted:
                keep = {k: v for k, v in data["params"].items() if k in ("miss_weight", "home_fraction", "waiting_tokens")}
                data = {"type": "predicted-latency-scorer", "name": spec.key, "params": keep}
            data["params"] = {**data["params"], **params}
        plugins.append(data)
    prof = {**profile.model_dump(), "name": name}
    if picker is not None:
        plugins.append({**picker, "name": "guard"})
        prof["picker"] = "guard"
    return RoutingConfig.model_validate({"plugins": plugins, "profiles": [prof]}, context={"registry": registry})


# Policies that need the engines to publish KV events, and the key mode of their index.
KV_FEED_POLICIES = {"precise": "tokens", "precise-engine": "engine"}


def policy_config(name: str, registry: Registry) -> RoutingConfig:
    try:
        data = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy '{name}'; choose from {', '.join(POLICIES)}") from None
    if name in CANDIDATES:
        return _candidate(name, registry)
    if name == "oracle" or name in KV_FEED_POLICIES:
        # The default profile with the approximate prefix index swapped for the engines' true state,
        # or for the index their KV events feed.
        defaults = RoutingConfig()
        swap = ({"type": "oracle-prefix-scorer", "name": "prefix"} if name == "oracle" else
                {"type": "eval-precise-prefix-scorer", "name": "prefix", "params": {"key_mode": KV_FEED_POLICIES[name]}})
        plugins = [swap if p.type == "prefix-cache-scorer" else p.model_dump() for p in defaults.plugins]
        profile = defaults.profile(None)
        assert profile is not None
        data = {"plugins": plugins, "profiles": [{**profile.model_dump(), "name": name}]}
    return RoutingConfig.model_validate(data, context={"registry": registry})
