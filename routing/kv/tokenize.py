"""Tokenizing a request as the engine will, so its block keys can be computed before it is sent.

``SimTokenizer`` reproduces the simulator (its chat template and tiktoken o200k); ``HFTokenizer``
a real model from a local ``tokenizer.json`` and a Jinja chat template. Both cache by prefix:
``SegmentCache`` splits the rendered text at boundaries where BPE cannot merge across (a letter, a
space, a letter), so a shared system prompt or document is tokenized once and reused.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from routing.types import RoutingRequest

__all__ = ["HFTokenizer", "PromptTokenizer", "SegmentCache", "SimTokenizer", "safe_cuts"]

# A cut between an ASCII letter and a space that precedes a letter: in the o200k / cl100k / Llama-3
# pre-tokenizer regexes, a letter run always ends there and the next piece starts with the space,
# so encode(a + b) == encode(a) + encode(b). (Checked against whole-text encoding in the tests.)
_SAFE = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")


def safe_cuts(text: str, every: int) -> list[int]:
    """Deterministic cut positions about every ``every`` characters (the first safe one past each
    target), so two texts sharing a prefix share every cut that lies well inside it."""
    cuts: list[int] = []
    pos = every
    n = len(text)
    search = _SAFE.search
    while pos < n:
        m = search(text, pos)
        if m is None:
            break
        cuts.append(m.start())
        pos = m.start() + every
    return cuts


class SegmentCache:
    """Token ids of text segments, keyed by a chained digest of everything up to the segment's end.

    Bounded by the total token ids held (LRU). A lookup walks the segments from the start; the first
    miss and every segment after it are encoded (each alone, which is exact at safe cuts) and cached.
    """

    def __init__(self, encode: Callable[[str], list[int]], every: int = 2048, max_tokens: int = 2_000_000) -> None:
        self._encode = encode
        self.every = every
        self.max_tokens = max_tokens
        self._segments: OrderedDict[bytes, list[int]] = OrderedDict()
        self._tokens = 0
        self.hits = self.misses = 0

    def encode(self, text: str) -> list[int]:
        cuts = safe_cuts(text, self.every)
        out: list[int] = []
        key = b""
        start = 0
        segments = self._segments
        for end in [*cuts, len(text)]:
            piece = text[start:end]
            key = hashlib.blake2b(key + piece.encode(), digest_size=16).digest()
            ids = segments.get(key)
            if ids is None:
                self.misses += 1
                ids = self._encode(piece)
                if end != len(text):  # the tail is the request's own: not worth keeping
                    segments[key] = ids
                    self._tokens += len(ids)
            else:
                self.hits += 1
                segments.move_to_end(key)
            out += ids
            start = end
        while self._tokens > self.max_tokens and segments:
            _, ids = segments.popitem(last=False)
            self._tokens -= len(ids)
        return out


@runtime_checkable
class PromptTokenizer(Protocol):
    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        """The prompt's token ids as the engine will see them; None when this request cannot be tokenized."""
        ...


class SimTokenizer:
    """The simulator's tokenization: its chat template (tools, generation prompt) and tiktoken o200k."""

    def __init__(self, every: int = 2048, max_tokens: int = 2_000_000) -> None:
        from simulator import openai_api, tokenizer

        self._cache = SegmentCache(tokenizer.encode, every, max_tokens)
        # Load the encoding (0.5 s of CPU idle, seconds on a busy host) and the template now, at start-up:
        # lazily, the first request paid it with the event loop blocked, so scrapes and KV events stalled
        # and that gateway answered from a view seconds old (seen as active-active disagreements).
        tokenizer.encode("warm")
        openai_api.chat_prompt_text({"messages": [{"role": "user", "content": "warm"}]})

    @property
    def cache(self) -> SegmentCache:
        return self._cache

    def text(self, req: RoutingRequest) -> str | None:
        from simulator.openai_api import chat_prompt_text

        body = req.body
        if body is None:
            return None
        if req.route == "chat/completions":
            try:
                return chat_prompt_text(dict(body))
            except Exception:  # noqa: BLE001 - the engine will reject it; nothing to route by
                return None
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None

    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        body = req.body
        if body is not None and req.route == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
                return list(prompt)
        text = self.text(req)
        return None if text is None else self._cache.encode(text)


class HFTokenizer:
    """A real model's tokenizer: ``tokenizer.json`` (Hugging Face ``tokenizers``) and its Jinja chat
    template, rendered as ``transformers.apply_chat_template`` does (sandboxed, trim/lstrip blocks).

    Chat prompts are encoded without special tokens (the template writes them); completion prompts with
    them, as vLLM does. ``segment_cache`` splits at letter-space-letter cuts (safe for byte-level BPE
    tokenizers such as Llama-3's; not for SentencePiece ones that prepend a space marker): otherwise
    whole prompts are cached.
    """

    def __init__(self, tokenizer_json: str | Path, chat_template: str, *, special: Mapping[str, str] | None = None,
                 segment_cache: bool = False, max_entries: int = 256) -> None:
        import jinja2.sandbox
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(chat_template)
        self._special = dict(special or {})
        self._chat = (SegmentCache(self._encode_plain) if segment_cache else None)
        self._whole: OrderedDict[str, list[int]] = OrderedDict()
        self._max = max_entries

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def render(self, body: Mapping[str, Any]) -> str:
        return str(self._template.render(messages=body.get("messages"), tools=body.get("tools"),
                                         add_generation_prompt=body.get("add_generation_prompt", True),
                                         **self._special))

    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        body = req.body
        if body is None:
            return None
        try:
            if req.route == "chat/completions":
                text = self.render(body)
                if self._chat is not None:
                    return self._chat.encode(text)
                return self._cached(text, self._encode_plain)
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return self._cached("\x00" + prompt, lambda t: list(self._tok.encode(t[1:]).ids))
        except Exception:  # noqa: BLE001 - a template error: nothing to route by
            return None
        return None

    def _cached(self, text: str, encode: Callable[[str], list[int]]) -> list[int]:
        ids = self._whole.get(text)
        if ids is None:
            ids = self._whole[text] = encode(text)
            if len(self._whole) > self._max:
                self._whole.popitem(last=False)
        else:
            self._whole.move_to_end(text)
        return ids


def _raise(message: str) -> None:
    raise ValueError(message)
