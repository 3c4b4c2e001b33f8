"""Estimate a prompt's tokens before the backend counts them, cheaply enough for every request.

tiktoken (o200k_base) on short prompts; a bytes-per-token ratio learnt from real usage on long
ones, where tiktoken costs more than the whole gateway hop (measurements in docs/policies.md).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

__all__ = ["TokenEstimator"]

log = logging.getLogger("gravity.policies.estimate")

# Until usage teaches us better, assume dense text: over-reserving is refunded, under-reserving is overshoot.
INITIAL_BYTES_PER_TOKEN = 3.0
_EWMA = 0.1
_PER_MESSAGE = 4  # chat templates add a few tokens around each message
_RATIO_BOUNDS = (1.0, 8.0)


def _load_o200k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("o200k_base")


class TokenEstimator:
    def __init__(self, mode: str = "auto", tiktoken_max_bytes: int = 2048,
                 loader: Callable[[], Any] = _load_o200k) -> None:
        self.mode = mode
        self.tiktoken_max_bytes = tiktoken_max_bytes if mode == "auto" else (0 if mode == "bytes" else 1 << 62)
        self._loader = loader
        self._encoding: Any = None
        self._ratio: dict[str, float] = {}

    def load(self) -> None:
        """Load the BPE ranks once at start-up (~0.7 s); without them every estimate uses bytes."""
        if self.tiktoken_max_bytes <= 0 or self._encoding is not None:
            return
        try:
            self._encoding = self._loader()
        except Exception as exc:  # noqa: BLE001 - an estimate is still possible without tiktoken
            log.warning("tiktoken unavailable (%s); estimating prompt tokens from bytes", exc)
            self.tiktoken_max_bytes = 0

    def bytes_per_token(self, model: str) -> float:
        return self._ratio.get(model, INITIAL_BYTES_PER_TOKEN)

    def estimate(self, model: str, prompt: bytes, messages: int = 0) -> int:
        """Tokens of a rendered prompt (`RoutingRequest.prompt`) plus a per-message template allowance."""
        if self._encoding is not None and len(prompt) <= self.tiktoken_max_bytes:
            n = len(self._encoding.encode_ordinary(prompt.decode("utf-8", "replace")))
        else:
            n = math.ceil(len(prompt) / self.bytes_per_token(model))
        return n + _PER_MESSAGE * messages

    def observe(self, model: str, prompt_bytes: int, prompt_tokens: int) -> None:
        """Learn the model's bytes per token from a response's `usage.prompt_tokens`."""
        if prompt_bytes < 256 or prompt_tokens <= 0:
            return  # short prompts are dominated by template tokens and teach nothing about text
        seen = min(max(prompt_bytes / prompt_tokens, _RATIO_BOUNDS[0]), _RATIO_BOUNDS[1])
        old = self._ratio.get(model)
        self._ratio[model] = seen if old is None else old + _EWMA * (seen - old)
