"""Tokenizer and chat template for the simulator: tiktoken o200k_base from the shipped cache.

Also produces deterministic, seeded output tokens whose decoded text reads as English words.
"""
from __future__ import annotations

import functools
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

_TIKTOKEN_CACHE = Path(__file__).resolve().parents[1] / "config" / "tiktoken"

# Common words that are each ONE o200k token when preceded by a space.
# A paragraph reads better than 145 quoted words.
_WORDS = (  # noqa: SIM905
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there had been one all we their has would when if so no will more "
    "can out other who some what up about into than them only its could time these two may first then "
    "do any like my now over such our man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long here get both between life being under "
    "never day same another know while last might us great old year off come since against go came "
    "right used take three"
).split()


@functools.cache
def _encoding() -> tiktoken.Encoding:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))
    return tiktoken.get_encoding("o200k_base")


@functools.cache
def _vocab() -> tuple[tuple[int, ...], int]:
    """(single-token words, the full stop token)."""
    enc = _encoding()
    words = tuple(t[0] for w in _WORDS if len(t := enc.encode(" " + w)) == 1)
    return words, enc.encode(".")[0]


def encode(text: str) -> list[int]:
    # Template markers such as <|eot_id|> are plain text in o200k, never special tokens.
    return _encoding().encode(text, disallowed_special=())


def vocab_size() -> int:
    """Token ids the model knows are 0 <= id < vocab_size()."""
    return int(_encoding().max_token_value) + 1


def decode(ids: Sequence[int]) -> str:
    return _encoding().decode(list(ids))


def output_tokens(seed: int, n: int) -> list[int]:
    """`n` token ids drawn deterministically from `seed`: words, with a full stop now and then."""
    words, stop = _vocab()
    rng = random.Random(seed)
    out: list[int] = []
    until_stop = rng.randint(6, 14)
    for _ in range(n):
        until_stop -= 1
        if until_stop == 0:
            out.append(stop)
            until_stop = rng.randint(6, 14)
        else:
            out.append(words[rng.randrange(len(words))])
    return out


def content_text(content: Any) -> str:
    """Flatten OpenAI message content (a string or a list of parts) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind in ("image_url", "input_image", "image"):
                    parts.append("<|image|>")
                elif kind in ("input_audio", "audio_url"):
                    parts.append("<|audio|>")
                else:
                    raise ValueError(f"unsupported content part type {kind!r}")
            else:
                raise ValueError("message content parts must be objects")  # noqa: TRY004 - a 400, not a bug
        return "\n".join(parts)
    raise ValueError("message content must be a string or a list of parts")


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """Render messages with a Llama-3-style template.

    `continue_final_message` leaves the last message open (no end-of-turn) so the model continues
    it; vLLM refuses it together with `add_generation_prompt`, and so do we.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if not messages:
        raise ValueError("messages must not be empty")
    out = ["<|begin_of_text|>"]
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        text = content_text(msg.get("content"))
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}")
        if not (continue_final_message and i == last):
            out.append("<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)
