"""The package's public surface and the CLI's flag parsing."""
from __future__ import annotations

import pytest

import simulator
from simulator.cli import build_parser, config_from_args, parse_lora_modules


def test_public_api_is_explicit() -> None:
    assert sorted(simulator.__all__) == sorted([
        "Engine", "EngineConfig", "EngineRunner", "EngineStats", "Histogram", "KVCache", "RequestResult",
        "RequestStream", "SimRequest", "StepOutcome", "TokenEvent", "get_profile", "profile_names", "replay"])
    for name in simulator.__all__:
        assert getattr(simulator, name)


def test_cli_flags_build_the_server_config() -> None:
    args = build_parser().parse_args([
        "--model", "meta/llama", "--served-model-name", "llama", "--profile", "h100-8b", "--kv-blocks", "100",
        "--max-num-seqs", "4", "--time-scale", "10", "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}',
        "--scheduling-policy", "priority", "--fail-next", "2", "--fail-status", "503", "--latency-ms", "5",
        "--stall-after", "3", "--seed", "7"])
    cfg = config_from_args(args)
    assert cfg.names == ["llama"] and cfg.model == "meta/llama" and cfg.time_scale == 10
    assert (cfg.engine.kv_blocks, cfg.engine.max_num_seqs, cfg.engine.block_size) == (100, 4, 16)
    assert cfg.engine.scheduling_policy == "priority" and cfg.engine.seed == 7
    assert cfg.lora_modules == {"a": "/p/a", "b": "/p/b"}
    assert (cfg.faults.fail_next, cfg.faults.fail_status, cfg.faults.stall_after) == (2, 503, 3)


def test_bad_flags_are_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--profile", "nope"])
    with pytest.raises(ValueError, match="fail_status"):
        config_from_args(build_parser().parse_args(["--fail-status", "200"]))
    with pytest.raises(Exception, match="name=path"):
        parse_lora_modules(["nopath"])
