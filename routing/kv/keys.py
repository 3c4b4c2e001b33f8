"""A request's block keys, computed as the index is keyed: the engine's hash (``engine``) or the
gateway's own hash of the token ids (``tokens``), over the request's tokenization.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from routing.kv.state import ROOT_KEY, KeyMode, token_block_keys
from routing.kv.tokenize import PromptTokenizer
from routing.kv.wire import fold_hash
from routing.types import RoutingRequest

__all__ = ["RequestKeyer"]


class RequestKeyer:
    """Token ids and block keys of a request, memoised for the request being scheduled.

    ``engine_hasher`` (``engine`` mode) must hash exactly as the engines do: an object with
    ``extend(hashes, token_ids, block_size, cache_salt, lora)`` such as ``simulator.vllm_hash.VllmBlockHasher``.
    ``tokenize_s`` accumulates the time spent tokenizing, reported apart from scoring.
    """

    def __init__(self, tokenizer: PromptTokenizer, mode: KeyMode = "tokens", *, engine_hasher: Any = None,
                 max_blocks: int = 8192, timer: Callable[[], float] = time.perf_counter) -> None:
        if mode == "engine" and engine_hasher is None:
            raise ValueError("engine mode needs the engines' hasher (algorithm and seed)")
        self.tokenizer = tokenizer
        self.mode = mode
        self._hasher = engine_hasher
        self.max_blocks = max_blocks
        self._timer = timer
        self._memo_req: RoutingRequest | None = None
        self._memo_tokens: list[int] | None = None
        self._memo_keys: dict[int, list[int]] = {}
        self.tokenize_s = 0.0
        self.hash_s = 0.0

    def tokens(self, req: RoutingRequest) -> list[int] | None:
        if req is not self._memo_req:
            t = self._timer()
            self._memo_tokens = self.tokenizer.token_ids(req)
            self.tokenize_s += self._timer() - t
            self._memo_req = req
            self._memo_keys = {}
        return self._memo_tokens

    def keys(self, req: RoutingRequest, block_size: int) -> list[int]:
        tokens = self.tokens(req)
        if not tokens:
            return []
        keys = self._memo_keys.get(block_size)
        if keys is None:
            t = self._timer()
            ids = tokens[:self.max_blocks * block_size]
            if self.mode == "engine":
                digests = self._hasher.extend([], ids, block_size, req.cache_salt, req.lora)
                keys = [fold_hash(d) for d in digests]
            else:
                n = len(ids) // block_size
                extras = [_extra(i, req.cache_salt, req.lora) for i in range(n)] if (req.cache_salt or req.lora) else None
                keys = token_block_keys(ROOT_KEY, ids, block_size, extras)
            self.hash_s += self._timer() - t
            self._memo_keys[block_size] = keys
        return keys


def _extra(i: int, salt: str | None, lora: str | None) -> list[str] | None:
    # The untagged per-block extra keys vLLM publishes: LoRA name on every block, salt on the first.
    out = ([lora] if lora else []) + ([salt] if salt and i == 0 else [])
    return out or None
