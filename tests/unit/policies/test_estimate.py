from __future__ import annotations

import os

from policies.estimate import INITIAL_BYTES_PER_TOKEN, TokenEstimator
from tests.support.procs import REPO

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO / "config" / "tiktoken"))


def test_tiktoken_counts_short_prompts() -> None:
    est = TokenEstimator("auto", tiktoken_max_bytes=100)
    est.load()
    assert est.estimate("m", b"hello world") == 2
    assert est.estimate("m", b"user\x1fhello world\x1e", messages=1) >= 2 + 4


def test_long_prompts_use_bytes_and_learn_the_ratio_from_usage() -> None:
    est = TokenEstimator("auto", tiktoken_max_bytes=100)
    est.load()
    long = b"x" * 3000
    assert est.estimate("m", long) == int(3000 / INITIAL_BYTES_PER_TOKEN)
    for _ in range(100):
        est.observe("m", 3000, 750)  # this model sees 4 bytes per token
    assert abs(est.bytes_per_token("m") - 4.0) < 0.01
    assert est.estimate("m", long) == 750
    assert est.bytes_per_token("other") == INITIAL_BYTES_PER_TOKEN
    est.observe("m", 100, 1)  # too short to teach anything
    assert abs(est.bytes_per_token("m") - 4.0) < 0.01


def test_a_missing_tokenizer_falls_back_to_bytes() -> None:
    def broken() -> object:
        raise OSError("no BPE file")
    est = TokenEstimator("tiktoken", loader=broken)
    est.load()
    assert est.estimate("m", b"abcdef") == 2


def test_bytes_mode_never_loads_tiktoken() -> None:
    def fail() -> object:
        raise AssertionError("loaded")
    est = TokenEstimator("bytes", loader=fail)
    est.load()
    assert est.estimate("m", b"abc") == 1
