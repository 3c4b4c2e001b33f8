from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from policies.config import PoliciesConfig

SHA = "ab" * 32


def test_defaults_limit_nothing_and_need_no_key() -> None:
    cfg = PoliciesConfig()
    assert cfg.auth.enabled is False
    assert cfg.tenants == {}
    assert cfg.rate_limits.failure_mode == "open"
    assert parse_config({}).policies == cfg


def test_a_full_section_parses() -> None:
    cfg = parse_config({"policies": {
        "auth": {"enabled": True, "keys": [{"name": "ci", "sha256": SHA.upper(), "tenant": "team-a",
                                           "models": ["m"], "priority": "critical",
                                           "limits": {"tpm": 1000, "concurrency": 2}}]},
        "tenants": {"team-a": {"limits": {"rpm": 10}, "models": {"m": {"tpd": 10_000}}}},
        "rate_limits": {"failure_mode": "closed", "default_max_tokens": 256},
        "priority": {"upstream": True},
    }}).policies
    key = cfg.auth.keys[0]
    assert key.sha256 == SHA  # normalised to lower case
    assert key.limits.tpm == 1000 and cfg.tenants["team-a"].models["m"].tpd == 10_000


@pytest.mark.parametrize(("section", "message"), [
    ({"auth": {"keys": [{"name": "k", "sha256": "sk-plaintext"}]}},
     "policies.auth.keys[0].sha256: must be the 64 hex digits"),
    ({"auth": {"keys": [{"name": "a", "sha256": SHA}, {"name": "b", "sha256": SHA}]}},
     "auth.keys[1].sha256: same key as auth.keys[0]"),
    ({"tenants": {"a{b}": {}}}, "tenant name 'a{b}'"),
    ({"tenants": {"t": {"limits": {"tpm": 0}}}}, "policies.tenants.t.limits.tpm"),
    ({"rate_limits": {"failure_mode": "maybe"}}, "policies.rate_limits.failure_mode"),
    ({"rate_limits": {"bogus": 1}}, "policies.rate_limits.bogus: Extra inputs are not permitted"),
    ({"priority": {"upstream_values": {"critical": 0}}}, "missing values for ['sheddable', 'standard']"),
    ({"auth": {"keys": [{"name": "k", "sha256": SHA, "priority": "critical", "max_priority": "standard"}]}},
     "policies.auth.keys[0]: priority 'critical' is above max_priority 'standard'"),
])
def test_bad_values_name_their_path(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policies": section})
    assert message in str(err.value)
