"""Profile selection: a requested name, config rules (model glob, adapter, priority), the default."""
from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from routing.config import RoutingConfig
from routing.errors import UnknownProfile
from routing.profiles import ProfileSelector
from routing.scheduler import build_scheduler
from routing.types import EndpointSpec, RoutingRequest
from tests.unit.routing.helpers import make_datastore

CFG = {
    "profiles": [
        {"name": "default", "plugins": [{"ref": "queue-scorer"}]},
        {"name": "rr", "picker": "round-robin"},
        {"name": "big", "plugins": [{"ref": "least-request-scorer"}]},
        {"name": "lora", "plugins": [{"ref": "lora-affinity-scorer"}]},
        {"name": "batch", "picker": "random"},
    ],
    "profile_rules": [
        {"model": "llama-70b*", "profile": "big"},
        {"lora": True, "profile": "lora"},
        {"priority": "batch", "model": "m*", "profile": "batch"},
    ],
}


def _req(**kw: object) -> RoutingRequest:
    return RoutingRequest(model=str(kw.pop("model", "m")), prompt=b"hello world " * 30, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("req", "expected"), [
    ({}, "default"),
    ({"model": "llama-70b-instruct"}, "big"),
    ({"model": "llama-8b"}, "default"),
    ({"lora": "sql-adapter"}, "lora"),
    ({"model": "llama-70b", "lora": "x"}, "big"),  # first matching rule wins
    ({"model": "base", "lora": "llama-70b-sql"}, "big"),  # a model glob also matches the adapter's name
    ({"priority": "batch"}, "batch"),
    ({"priority": "batch", "model": "other"}, "default"),  # every condition of a rule must hold
    ({"profile": "rr"}, "rr"),  # a name the caller passes beats every rule
    ({"profile": "rr", "model": "llama-70b"}, "rr"),
])
def test_selection_order(req: dict[str, object], expected: str) -> None:
    cfg = RoutingConfig.model_validate(CFG)
    selector = ProfileSelector([p.name for p in cfg.profiles], "default", cfg.profile_rules)
    assert selector.select(_req(**req)) == expected


def test_the_scheduler_runs_the_selected_profile_and_reports_it() -> None:
    cfg = RoutingConfig.model_validate(CFG)
    ds = make_datastore(["a", "b", "c"], model="m")
    ds.upsert(EndpointSpec("d", "http://d", frozenset({"llama-70b"})))
    sched = build_scheduler(cfg, ds, rng=random.Random(0))
    assert sched.schedule(_req()).profile == "default"
    assert sched.schedule(_req(model="llama-70b")).profile == "big"
    # Round robin really runs: three requests asking for it land on three endpoints.
    picks = []
    for _ in range(3):
        req = _req(profile="rr")
        decision = sched.schedule(req)
        sched.observe(req, decision.best.endpoint)
        assert decision.profile == "rr"
        picks.append(decision.best.endpoint)
    assert sorted(picks) == ["a", "b", "c"]


def test_an_unknown_requested_profile_is_a_routing_error() -> None:
    cfg = RoutingConfig.model_validate(CFG)
    sched = build_scheduler(cfg, make_datastore(), rng=random.Random(0))
    with pytest.raises(UnknownProfile) as info:
        sched.schedule(_req(profile="admin-only"))
    assert info.value.code == "unknown_profile"


def test_a_rule_naming_a_missing_profile_fails_validation_with_its_path() -> None:
    bad = {**CFG, "profile_rules": [{"model": "x", "profile": "default"}, {"lora": True, "profile": "ghost"}]}
    with pytest.raises(ValidationError, match=r"routing.profile_rules\[1\].profile: unknown profile 'ghost'"):
        RoutingConfig.model_validate(bad)
    with pytest.raises(ValidationError, match="Extra inputs"):
        RoutingConfig.model_validate({**CFG, "profile_rules": [{"profile": "rr", "header": "x"}]})
