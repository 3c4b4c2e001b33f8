from __future__ import annotations

import os

from policies.estimate import INITIAL_BYTES_PER_TOKEN, TokenEstimator
from tests.support.procs import REPO

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO / "config" / "tiktoken"))


def test_tiktoken_counts_short_prompts() -> None:
    est = TokenEstimator("auto", tiktoken_max_bytes=100)
    est.load()
    assert est.estimate("m", b"hello world").tokens == 2
    e = est.estimate("m", b"user\x1fhello world\x1e", messages=1)
    assert e.method == "tiktoken" and e.tokens >= 2 + 4


def test_long_prompts_use_bytes_and_learn_from_usage() -> None:
    est = TokenEstimator("auto", tiktoken_max_bytes=100)
    est.load()
    long = b"x" * 3000
    first = est.estimate("m", long)
    assert first.method == "bytes" and first.tokens == int(3000 / INITIAL_BYTES_PER_TOKEN)
    for _ in range(50):
        est.observe("m", first, 750)  # this model sees 4 bytes per token
    assert est.estimate("m", long).tokens == 750
    assert est.estimate("other", long).tokens == first.tokens  # learnt per model


def test_short_prompts_learn_the_backend_tokenizer_too() -> None:
    est = TokenEstimator("auto", tiktoken_max_bytes=100)
    est.load()
    e = est.estimate("m", b"one two three four five six seven eight")
    est.observe("m", e, e.raw * 3)  # a backend whose tokenizer splits three times finer
    assert est.estimate("m", b"one two three four five six seven eight").tokens == e.raw * 3
    est.observe("m", est.estimate("m", b"hi"), 1000)  # too small to teach anything
    assert est.scale("m", "tiktoken") == 3.0


def test_a_missing_tokenizer_falls_back_to_bytes() -> None:
    def broken() -> object:
        raise OSError("no BPE file")
    est = TokenEstimator("tiktoken", loader=broken)
    est.load()
    assert est.estimate("m", b"abcdef").tokens == 2


def test_bytes_mode_never_loads_tiktoken() -> None:
    def fail() -> object:
        raise AssertionError("loaded")
    est = TokenEstimator("bytes", loader=fail)
    est.load()
    assert est.estimate("m", b"abc").tokens == 1
