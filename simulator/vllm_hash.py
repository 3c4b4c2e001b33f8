"""Prefix-cache block hashes computed the way vLLM computes them, for KV events a router can match.

Follows vLLM 0.33's definitions (``vllm/utils/hashing.py``, ``vllm/v1/core/kv_cache_utils.py``):
each FULL block hashes ``(parent_hash, tuple(token_ids), extra_keys)`` with the configured function,
the first block's parent being ``NONE_HASH = hash_fn(seed)``. The derivation and the test vectors
taken from vLLM's own wheel are in docs/kv-events.md.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
import xxhash

__all__ = [
    "ALGOS",
    "DEFAULT_NONE_HASH_SEED",
    "Compat",
    "VllmBlockHasher",
    "hash_function",
    "resolve_none_hash_seed",
    "to_int_hash",
]

Algo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
ALGOS: tuple[Algo, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
Compat = Literal["current", "untagged"]
# vLLM >= 0.3x: without PYTHONHASHSEED, the collision-resistant algorithms seed NONE_HASH with this
# fixed string (so independent replicas agree); the xxhash ones draw a random per-process seed.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_NON_CRYPTO: frozenset[str] = frozenset({"xxhash", "xxhash_cbor"})
_MASK64 = (1 << 64) - 1


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _xxhash(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _xxhash_cbor(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256, "sha256_cbor": _sha256_cbor, "xxhash": _xxhash, "xxhash_cbor": _xxhash_cbor,
}


def hash_function(algo: str) -> Callable[[Any], bytes]:
    """vLLM's ``--prefix-caching-hash-algo`` functions: pickle or canonical CBOR, then SHA-256 or XXH3-128."""
    try:
        return _FUNCTIONS[algo]
    except KeyError:
        raise ValueError(f"unknown prefix caching hash algorithm {algo!r}; choose from {', '.join(ALGOS)}") from None


def resolve_none_hash_seed(algo: str, env: Mapping[str, str] | None = None, compat: Compat = "current") -> str:
    """The string NONE_HASH is hashed from: PYTHONHASHSEED when set; otherwise the fixed default for
    SHA-256 (``current``), or a random one (xxhash, and every algorithm under ``untagged``, as vLLM
    did before the fixed default)."""
    env = os.environ if env is None else env
    seed = env.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if compat == "current" and algo not in _NON_CRYPTO:
        return DEFAULT_NONE_HASH_SEED
    return os.urandom(32).hex()


def to_int_hash(digest: bytes) -> int:
    """The 64-bit form vLLM publishes with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (its default):
    the digest read big-endian, low 64 bits."""
    return int.from_bytes(digest, "big") & _MASK64


@dataclass(frozen=True)
class VllmBlockHasher:
    """Chained block hashes for one engine: algorithm, NONE_HASH, extra-key style, LoRA paths.

    ``compat="current"`` tags extra keys by source as vLLM 0.33 does (``("lora", name, path)``,
    ``("cache_salt", salt)``); ``"untagged"`` uses the bare name and salt of earlier releases.
    """

    algo: str = "sha256"
    none_hash: bytes = b""
    compat: Compat = "current"
    lora_paths: Mapping[str, str] | None = None
    int_hashes: bool = True

    @classmethod
    def create(cls, algo: str = "sha256", *, env: Mapping[str, str] | None = None, compat: Compat = "current",
               lora_paths: Mapping[str, str] | None = None) -> VllmBlockHasher:
        env = os.environ if env is None else env
        fn = hash_function(algo)
        seed = resolve_none_hash_seed(algo, env, compat)
        int_hashes = bool(int(env.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")))
        return cls(algo, fn(seed), compat, dict(lora_paths or {}), int_hashes)

    def extra_keys(self, block_index: int, cache_salt: str | None, lora: str | None) -> tuple[Any, ...] | None:
        """The extra keys mixed into a block's hash: the LoRA on every block, the salt on the first."""
        keys: list[Any] = []
        tagged = self.compat == "current"
        if lora is not None:
            path = (self.lora_paths or {}).get(lora, "")
            keys.append(("lora", lora, path) if tagged else lora)
        if block_index == 0 and cache_salt:
            keys.append(("cache_salt", cache_salt) if tagged else cache_salt)
        return tuple(keys) if keys else None

    def event_extra_keys(self, block_index: int, cache_salt: str | None, lora: str | None) -> tuple[Any, ...] | None:
        """What a ``BlockStored`` publishes per block: the untagged values (vLLM's ``to_event_extra_keys``)."""
        keys: list[Any] = []
        if lora is not None:
            keys.append(lora)
        if block_index == 0 and cache_salt:
            keys.append(cache_salt)
        return tuple(keys) if keys else None

    def hash_block(self, parent: bytes | None, tokens: Sequence[int], extra: tuple[Any, ...] | None) -> bytes:
        # vLLM: `if not parent_block_hash: parent_block_hash = NONE_HASH`.
        return _FUNCTIONS[self.algo]((parent or self.none_hash, tuple(tokens), extra))

    def extend(self, hashes: list[Any], token_ids: Sequence[int], block_size: int,
               cache_salt: str | None = None, lora: str | None = None) -> list[Any]:
        """Append the hashes of every FULL block of ``token_ids`` not yet in ``hashes``, in place."""
        fn = _FUNCTIONS[self.algo]
        parent: bytes = hashes[-1] if hashes else self.none_hash
        for i in range(len(hashes), len(token_ids) // block_size):
            extra = self.extra_keys(i, cache_salt, lora)
            parent = fn((parent, tuple(token_ids[i * block_size:(i + 1) * block_size]), extra))
            hashes.append(parent)
        return hashes

    def external(self, digest: bytes) -> int | bytes:
        """A hash as it goes on the wire."""
        return to_int_hash(digest) if self.int_hashes else digest
