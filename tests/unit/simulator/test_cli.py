"""`gravity sim` flags: the defaults a new user gets, and that --help states them."""
from __future__ import annotations

from simulator.cli import build_parser, config_from_args
from simulator.profiles import get_profile


def test_default_profile_is_the_realistic_one_make_run_uses() -> None:
    cfg = config_from_args(build_parser().parse_args([]))
    realistic = get_profile("h100-8b")
    assert cfg.engine == realistic
    # A first 5k-token prompt must fit; the test profile's 4,096-token context rejected it.
    assert cfg.engine.max_model_len >= 5_000 + 1_000


def test_tiny_profile_is_still_selectable_for_tests() -> None:
    cfg = config_from_args(build_parser().parse_args(["--profile", "tiny"]))
    assert cfg.engine == get_profile("tiny")


def test_help_states_the_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    for expected in ("(default: h100-8b)", "(default: 8000)", "(default: sim-llama)", "(default: 1.0)"):
        assert expected in text, expected


def test_demo_starts_simulators_with_the_same_default_profile() -> None:
    from gateway.demo import build_parser as demo_parser

    assert demo_parser().parse_args([]).profile == build_parser().parse_args([]).profile
