"""Block hashes against vectors computed by vLLM 0.33.0's own functions (tests/support/vllm_vectors.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from simulator.vllm_hash import ALGOS, DEFAULT_NONE_HASH_SEED, VllmBlockHasher, hash_function, to_int_hash

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "vllm_vectors.json").read_text())
H = VECTORS["hashes"]
CASES = {"plain": (None, None), "lora": ("sql", None), "salt": (None, "tenant-a"), "lora+salt": ("sql", "tenant-a")}
SEEDS = {"PYTHONHASHSEED=0": {"PYTHONHASHSEED": "0"}, "unset": {}}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("seed_case", sorted(SEEDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_hashes_match_vllm(algo: str, seed_case: str, case: str) -> None:
    expected = H["algos"][algo].get(seed_case)
    if expected is None:
        pytest.skip("xxhash without PYTHONHASHSEED is random per process in vLLM too")
    hasher = VllmBlockHasher.create(algo, env=SEEDS[seed_case], lora_paths={"sql": "/adapters/sql"})
    assert hasher.none_hash.hex() == expected["none_hash_hex"]
    lora, salt = CASES[case]
    got = hasher.extend([], H["tokens"], H["block_size"], salt, lora)
    want = expected["cases"][case]
    assert [h.hex() for h in got] == want["hashes_hex"]
    assert [hasher.external(h) for h in got] == want["int_hashes"]
    event_keys = [hasher.event_extra_keys(i, salt, lora) for i in range(len(got))]
    assert [None if k is None else list(k) for k in event_keys] == want["event_extra_keys"]


def test_salt_and_lora_separate_hashes_and_only_full_blocks_count() -> None:
    hasher = VllmBlockHasher.create("sha256", env={"PYTHONHASHSEED": "0"})
    tokens = list(range(40))
    plain = hasher.extend([], tokens, 16)
    assert len(plain) == 2  # 40 tokens: two full blocks, the partial one is never hashed
    salted = hasher.extend([], tokens, 16, cache_salt="a")
    assert salted[0] != plain[0] and salted[1] != plain[1]  # the salt is on block 0 and chains on
    assert hasher.extend([], tokens, 16, lora="x") != plain
    # Incremental extension equals one pass.
    assert hasher.extend(hasher.extend([], tokens[:20], 16), tokens, 16) == plain


def test_seed_rules() -> None:
    fixed = VllmBlockHasher.create("sha256", env={})
    assert fixed.none_hash == hash_function("sha256")(DEFAULT_NONE_HASH_SEED)
    # xxhash without a seed is random per process, and so is every algorithm under the older rule.
    assert VllmBlockHasher.create("xxhash", env={}).none_hash != VllmBlockHasher.create("xxhash", env={}).none_hash
    old = VllmBlockHasher.create("sha256", env={}, compat="untagged")
    assert old.none_hash != VllmBlockHasher.create("sha256", env={}, compat="untagged").none_hash
    assert VllmBlockHasher.create("sha256", env={"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "0"}).int_hashes is False
    with pytest.raises(ValueError, match="unknown prefix caching hash"):
        hash_function("md5")


def test_int_form_is_low_64_bits_big_endian() -> None:
    digest = bytes(range(32))
    assert to_int_hash(digest) == int.from_bytes(digest[-8:], "big")


@pytest.mark.skipif(not os.environ.get("GRAVITY_VLLM_WHEEL"), reason="set GRAVITY_VLLM_WHEEL to a vllm wheel")
def test_committed_vectors_regenerate_from_the_wheel() -> None:
    from tests.support.vllm_vectors import hash_vectors

    assert hash_vectors(Path(os.environ["GRAVITY_VLLM_WHEEL"])) == json.loads(json.dumps(H))
