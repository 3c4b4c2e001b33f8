"""Tokenizing as the engine does: segment-cached encoding equals whole-text encoding, the simulator's
chat rendering is reproduced, and a real tokenizer.json with a Jinja template works."""
from __future__ import annotations

import json
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from routing.kv.tokenize import HFTokenizer, SegmentCache, SimTokenizer, safe_cuts
from routing.types import RoutingRequest
from simulator import tokenizer as sim_tok
from simulator.openai_api import chat_prompt_text

ALPHABET = "ab Z z.,!?'\n\t 12é中-<|>_"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=0, max_size=400), st.integers(min_value=4, max_value=64))
def test_segmented_encoding_equals_whole_text_encoding(text: str, every: int) -> None:
    cache = SegmentCache(sim_tok.encode, every=every)
    assert cache.encode(text) == sim_tok.encode(text)
    assert cache.encode(text) == sim_tok.encode(text)  # and again from the cache


def test_shared_prefix_is_tokenized_once() -> None:
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "route", "cache"]
    doc = " ".join(rng.choice(words) for _ in range(3000))
    cache = SegmentCache(sim_tok.encode, every=512)
    first = cache.encode(doc + " question one?")
    misses = cache.misses
    second = cache.encode(doc + " another question entirely?")
    assert first == sim_tok.encode(doc + " question one?")
    assert second == sim_tok.encode(doc + " another question entirely?")
    assert cache.misses - misses <= 2 and cache.hits >= len(safe_cuts(doc, 512)) - 1


def test_the_segment_cache_holds_at_most_max_tokens_and_stays_exact() -> None:
    rng = random.Random(2)
    words = ["alpha", "beta", "gamma", "delta", "route", "cache"]
    cache = SegmentCache(sim_tok.encode, every=256, max_tokens=2_000)
    docs = [" ".join(rng.choice(words) for _ in range(1500)) for _ in range(6)]  # ~9,000 tokens offered
    for doc in docs:
        assert cache.encode(doc + " why?") == sim_tok.encode(doc + " why?")
        assert cache._tokens <= 2_000 and sum(len(v) for v in cache._segments.values()) == cache._tokens
    # The newest document's head is still cached; the oldest one's is not.
    misses = cache.misses
    cache.encode(docs[-1][:300] + " again?")
    assert cache.misses - misses == 1  # only the new tail
    misses = cache.misses
    cache.encode(docs[0][:300] + " again?")
    assert cache.misses - misses == 2


def _req(route: str, body: dict[str, object]) -> RoutingRequest:
    return RoutingRequest(model="m", prompt=b"", route=route, body=body)


def test_sim_tokenizer_reproduces_the_simulators_prompt() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief. " * 300},
                                        {"role": "user", "content": "What is a KV cache?"}],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}
    tok = SimTokenizer(every=256)
    assert tok.token_ids(_req("chat/completions", body)) == sim_tok.encode(chat_prompt_text(body))
    assert tok.token_ids(_req("completions", {"prompt": "Once upon a time"})) == sim_tok.encode("Once upon a time")
    assert tok.token_ids(_req("completions", {"prompt": [5, 6, 7]})) == [5, 6, 7]
    assert tok.token_ids(_req("chat/completions", {"messages": "nope"})) is None
    assert tok.token_ids(RoutingRequest(model="m", prompt=b"x")) is None


def _tiny_tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cache routes the prefix to the replica"] * 50 + ["hello world"] * 20, trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_hf_tokenizer_renders_the_template_and_encodes_it(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = _tiny_tokenizer_json(tmp_path)
    hf = HFTokenizer(path, TEMPLATE, special={"bos_token": "<s>"})
    body = {"messages": [{"role": "user", "content": "the cache routes"}]}
    text = "<s><|user|>the cache routes\n<|assistant|>"
    assert hf.render(body) == text
    want = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    assert hf.token_ids(_req("chat/completions", body)) == want
    assert hf.token_ids(_req("chat/completions", body)) == want  # cached
    segmented = HFTokenizer(path, TEMPLATE, special={"bos_token": "<s>"}, segment_cache=True)
    long_body = {"messages": [{"role": "user", "content": "the cache routes the prefix " * 200}]}
    assert segmented.token_ids(_req("chat/completions", long_body)) == Tokenizer.from_file(str(path)).encode(
        segmented.render(long_body), add_special_tokens=False).ids
    bad = HFTokenizer(path, "{{ raise_exception('no') }}")
    assert bad.token_ids(_req("chat/completions", body)) is None
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
