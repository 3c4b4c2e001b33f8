"""Tokenizer: Llama-3-style chat rendering, o200k round trips, seeded readable output."""
from __future__ import annotations

from typing import Any

import pytest

from simulator import tokenizer


@pytest.mark.parametrize(("messages", "kw", "expected"), [
    ([{"role": "user", "content": "hi"}], {},
     ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     {"add_generation_prompt": False},
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na\nb<|eot_id|>"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}],
     {"add_generation_prompt": False, "continue_final_message": True},
     ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")),
])
def test_render_chat(messages: list[dict[str, Any]], kw: dict[str, bool], expected: str) -> None:
    assert tokenizer.render_chat(messages, **kw) == expected


@pytest.mark.parametrize(("messages", "kw"), [
    ([], {}),
    ([{"role": "user", "content": "x"}], {"continue_final_message": True}),
    ([{"content": "x"}], {}),
    ([{"role": "user", "content": [{"type": "weird"}]}], {}),
])
def test_render_chat_rejects(messages: list[dict[str, Any]], kw: dict[str, bool]) -> None:
    with pytest.raises(ValueError):
        tokenizer.render_chat(messages, **kw)


def test_encode_decode_round_trip() -> None:
    text = "Hello, world! <|eot_id|> ünïcode"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_output_tokens_are_seeded_and_readable() -> None:
    a = tokenizer.output_tokens(42, 30)
    assert a == tokenizer.output_tokens(42, 30) and a != tokenizer.output_tokens(43, 30)
    text = tokenizer.decode(a)
    words = text.replace(".", " ").split()
    assert len(words) >= 25 and all(w.isalpha() for w in words)
