"""Estimate a prompt's tokens before the backend counts them, cheaply enough for every request.

tiktoken (o200k_base) on short prompts; a bytes-per-token ratio learnt from real usage on long
ones, where tiktoken costs more than the whole gateway hop (measurements in docs/policies.md).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "TokenEstimator"]

log = logging.getLogger("gravity.policies.estimate")

# Until usage teaches us better, assume dense text: over-reserving is refunded, under-reserving is overshoot.
INITIAL_BYTES_PER_TOKEN = 3.0
_EWMA = 0.2
_PER_MESSAGE = 4  # chat templates add a few tokens around each message
_SCALE_BOUNDS = (0.25, 4.0)


def _load_o200k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("o200k_base")


@dataclass(frozen=True)
class Estimate:
    tokens: int
    """The estimate to reserve: `raw` times what usage taught us about this model."""
    raw: int
    method: str
    """"tiktoken" or "bytes"."""


class TokenEstimator:
    """Counts with tiktoken (short prompts) or bytes (long ones), then corrects by a per-model factor
    learnt from `usage.prompt_tokens`: the backend's tokenizer and chat template are not o200k's."""

    def __init__(self, mode: str = "auto", tiktoken_max_bytes: int = 1024,
                 loader: Callable[[], Any] = _load_o200k) -> None:
        self.mode = mode
        self.tiktoken_max_bytes = tiktoken_max_bytes if mode == "auto" else (0 if mode == "bytes" else 1 << 62)
        self._loader = loader
        self._encoding: Any = None
        self._scale: dict[tuple[str, str], float] = {}

    def load(self) -> None:
        """Load the BPE ranks once at start-up (~0.7 s); without them every estimate uses bytes."""
        if self.tiktoken_max_bytes <= 0 or self._encoding is not None:
            return
        try:
            self._encoding = self._loader()
        except Exception as exc:  # noqa: BLE001 - an estimate is still possible without tiktoken
            log.warning("tiktoken unavailable (%s); estimating prompt tokens from bytes", exc)
            self.tiktoken_max_bytes = 0

    def scale(self, model: str, method: str) -> float:
        return self._scale.get((model, method), 1.0)

    def estimate(self, model: str, prompt: bytes, messages: int = 0) -> Estimate:
        """Tokens of a rendered prompt (`RoutingRequest.prompt`) plus a per-message template allowance."""
        if self._encoding is not None and len(prompt) <= self.tiktoken_max_bytes:
            method = "tiktoken"
            n = len(self._encoding.encode_ordinary(prompt.decode("utf-8", "replace")))
        else:
            method = "bytes"
            n = math.ceil(len(prompt) / INITIAL_BYTES_PER_TOKEN)
        raw = n + _PER_MESSAGE * messages
        return Estimate(math.ceil(raw * self.scale(model, method)), raw, method)

    def observe(self, model: str, est: Estimate, prompt_tokens: int) -> None:
        """Learn how far off `est` was from a response's `usage.prompt_tokens`."""
        if est.raw < 4 or prompt_tokens <= 0:
            return  # too small to say anything about the tokenizer
        seen = min(max(prompt_tokens / est.raw, _SCALE_BOUNDS[0]), _SCALE_BOUNDS[1])
        key = (model, est.method)
        old = self._scale.get(key)
        self._scale[key] = seen if old is None else old + _EWMA * (seen - old)
