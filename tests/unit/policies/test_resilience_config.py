"""The `resilience:` section: defaults, per-model overrides, fallbacks, and the old server fields."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import parse_config
from policies.resilience import ResilienceConfig


def test_defaults_are_the_documented_ones() -> None:
    p = ResilienceConfig().attempt_policy("any")
    assert (p.connect_timeout_s, p.first_byte_timeout_s, p.stall_timeout_s, p.total_timeout_s) == (5, 300, 60, 1800)
    assert p.max_attempts == 3 and p.resume and p.max_resumes == 2
    assert p.retry_statuses == {429, 500, 502, 503, 504}
    assert p.circuit_statuses == {429, 500, 502, 503, 504}
    assert ResilienceConfig.model_validate({"circuit": {"on_status": [503]}}).attempt_policy("m").circuit_statuses \
        == {503}


def test_per_model_overrides_replace_only_what_they_name() -> None:
    cfg = ResilienceConfig.model_validate({
        "timeouts": {"stall_s": 10},
        "models": {"slow-reasoner": {"timeouts": {"stall_s": 300, "first_byte_s": 900}, "max_attempts": 1}}})
    slow, other = cfg.attempt_policy("slow-reasoner"), cfg.attempt_policy("chat")
    assert (slow.stall_timeout_s, slow.first_byte_timeout_s, slow.max_attempts) == (300, 900, 1)
    assert slow.connect_timeout_s == 5 and slow.total_timeout_s == 1800
    assert (other.stall_timeout_s, other.first_byte_timeout_s, other.max_attempts) == (10, 300, 3)


def test_500_can_be_taken_off_the_retried_statuses() -> None:
    cfg = ResilienceConfig.model_validate({"retries": {"on_status": [502, 503, 504]}})
    assert 500 not in cfg.attempt_policy("m").retry_statuses


@pytest.mark.parametrize("bad", [{"fallbacks": {"a": ["b", "a"]}}, {"retries": {"max_attempts": 0}},
                                 {"timeouts": {"stall_s": 0}}, {"circuit": {"open_s": -1}}, {"drain": {"x": 1}}])
def test_bad_values_are_refused_at_start(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ResilienceConfig.model_validate(bad)


def test_the_old_server_timeouts_still_fill_the_resilience_section() -> None:
    cfg = parse_config({"server": {"read_timeout_s": 42, "connect_timeout_s": 2}, "backends": []})
    p = cfg.resilience.attempt_policy("m")
    assert (p.connect_timeout_s, p.first_byte_timeout_s, p.stall_timeout_s) == (2, 42, 42)
    explicit = parse_config({"server": {"read_timeout_s": 42}, "backends": [],
                             "resilience": {"timeouts": {"stall_s": 7}}})
    assert explicit.resilience.attempt_policy("m").stall_timeout_s == 7
