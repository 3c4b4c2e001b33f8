"""Embeddings for the simulator: inputs and `dimensions` validated as vLLM validates them, and
deterministic unit vectors standing in for a pooled hidden state."""
from __future__ import annotations

import math
import random
import struct
import zlib
from typing import Any

from simulator import tokenizer
from simulator.openai_api import ApiError, check_token_ids, is_token_ids

__all__ = ["embedding", "embedding_dims", "embedding_inputs"]


def embedding_inputs(value: Any, max_model_len: int) -> list[list[int]]:
    """Token ids of each input, checked as vLLM checks them: ids inside the vocabulary, each input
    within the context length."""
    inputs: list[list[int]] | None = None
    if isinstance(value, str):
        inputs = [tokenizer.encode(value)]
    elif isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            inputs = [tokenizer.encode(v) for v in value]
        elif is_token_ids(value):
            inputs = [list(value)]
        elif all(is_token_ids(v) for v in value):
            inputs = [list(v) for v in value]
    if inputs is None:
        raise ApiError(400, "input must be a string, a list of strings, or (lists of) token ids", "input")
    for ids in inputs:
        check_token_ids(ids, "input")
        if len(ids) > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {len(ids)} tokens in the input for embedding generation. Please reduce "
                           f"the length of the input.", "input")
    return inputs


def embedding_dims(value: Any, model: str, hidden_size: int) -> int:
    """The simulated embedding model is a matryoshka model of `hidden_size` dimensions: fewer may be
    asked for, more may not (vLLM slices the pooled vector, so it can never return more either)."""
    if value is None:
        return hidden_size
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "dimensions must be an integer", "dimensions")
    if value < 1:
        raise ApiError(400, "Dimensions must be greater than 0", "dimensions")
    if value > hidden_size:
        raise ApiError(400, f'Model "{model}" has {hidden_size} embedding dimensions; dimensions must be at '
                       f"most {hidden_size}, got {value}.", "dimensions")
    return value


def embedding(ids: list[int], dims: int) -> list[float]:
    """A unit vector determined by the token ids alone."""
    rng = random.Random(zlib.crc32(struct.pack(f"<{len(ids)}q", *ids)))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
