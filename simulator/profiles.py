"""Named engine profiles: capacity and step-time defaults calibrated to published vLLM numbers.

Sources and derivations are in docs/simulator.md; `tiny` is a fast profile for tests.
"""
from __future__ import annotations

import dataclasses

from simulator.engine import EngineConfig

# Llama-3-8B KV per token: 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB,
# so one 16-token block is 2 MiB; 60 GiB of KV on an 80 GB H100 is 30,720 blocks.
_PROFILES: dict[str, EngineConfig] = {
    "h100-8b": EngineConfig(
        kv_blocks=30_720, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=131_072, prefill_base_s=0.030, prefill_per_token_s=0.00018,
        decode_base_s=0.012, decode_per_seq_s=0.00008, decode_per_kv_token_s=2.0e-8),
    # A100-80GB: ~2x slower prefill (312 vs 989 dense BF16 TFLOPS), ~1.6x slower decode
    # (2.0 vs 3.35 TB/s HBM); same KV budget.
    "a100-8b": EngineConfig(
        kv_blocks=28_000, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=131_072, prefill_base_s=0.040, prefill_per_token_s=0.00035,
        decode_base_s=0.019, decode_per_seq_s=0.00012, decode_per_kv_token_s=3.2e-8),
    # Llama-3-70B, TP=4 on H100s: KV per token is 320 KiB (80 layers), ~4x the weights per GPU.
    "h100x4-70b": EngineConfig(
        kv_blocks=24_000, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=131_072, prefill_base_s=0.045, prefill_per_token_s=0.00040,
        decode_base_s=0.022, decode_per_seq_s=0.00010, decode_per_kv_token_s=4.0e-8),
    # Small and fast, for tests: 4,096 tokens of KV, 5 ms decode steps.
    "tiny": EngineConfig(
        kv_blocks=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
        prefill_base_s=0.002, prefill_per_token_s=0.00002, decode_base_s=0.005, decode_per_seq_s=0.0005,
        natural_len_max=64),
}


DEFAULT_PROFILE = "h100-8b"
"""What `gravity sim` and `gravity demo` run unless told otherwise: a realistic replica (128k context,
30,720 KV blocks). `tiny` is for tests, which ask for it by name."""


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def get_profile(name: str, **overrides: object) -> EngineConfig:
    """A fresh copy of the named profile with `overrides` applied (None values are ignored)."""
    try:
        base = _PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(profile_names())}") from None
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
