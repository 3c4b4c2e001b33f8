"""Decoding vLLM's KV-event batches (msgpack) in either layout vLLM has shipped, into plain event values.

Pure: bytes in, :class:`Batch` out. Events may be maps tagged by ``"type"`` (current vLLM) or positional
arrays with the tag first (earlier releases, which also had fewer fields); missing trailing fields take
their defaults and unknown ones are ignored, so newer engines do not break older gateways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["Batch", "Cleared", "Removed", "Stored", "WireError", "decode_batch", "fold_hash"]

_MASK64 = (1 << 64) - 1
_DECODER = msgspec.msgpack.Decoder()
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


class WireError(ValueError):
    """A payload that is not a KV-event batch."""


def fold_hash(h: Any) -> int:
    """One 64-bit name per block whichever form the engine sends: ints as they are (vLLM's default
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` already took the low 64 bits), raw digests folded the
    same way (big-endian, low 64 bits)."""
    if isinstance(h, int) and not isinstance(h, bool):
        return h & _MASK64
    if isinstance(h, (bytes, bytearray)):
        return int.from_bytes(h, "big") & _MASK64
    raise WireError(f"block hash of type {type(h).__name__}")


@dataclass(frozen=True, slots=True)
class Stored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str = "GPU"
    extra_keys: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: list[int]
    medium: str = "GPU"


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        return str(raw.get("type", "")), raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        return raw[0], dict(zip(names, raw[1:], strict=False))
    raise WireError("an event must be a tagged map or an array with its tag first")


def _event(raw: Any) -> Event | None:
    kind = raw.get("type") if isinstance(raw, dict) else (raw[0] if isinstance(raw, list) and raw else None)
    if kind == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        hashes = f.get("block_hashes")
        tokens = f.get("token_ids")
        size = f.get("block_size")
        if not isinstance(hashes, list) or not isinstance(tokens, list) or not isinstance(size, int) or size < 1:
            raise WireError("BlockStored needs block_hashes, token_ids and a positive block_size")
        if len(tokens) != len(hashes) * size:
            raise WireError(f"BlockStored: {len(tokens)} token ids for {len(hashes)} blocks of {size}")
        parent = f.get("parent_block_hash")
        extra = f.get("extra_keys")
        return Stored([fold_hash(h) for h in hashes], None if parent is None else fold_hash(parent), tokens, size,
                      f.get("lora_name"), f.get("medium") or "GPU", extra if isinstance(extra, list) else None)
    if kind == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        hashes = f.get("block_hashes")
        if not isinstance(hashes, list):
            raise WireError("BlockRemoved needs block_hashes")
        return Removed([fold_hash(h) for h in hashes], f.get("medium") or "GPU")
    if kind == "AllBlocksCleared":
        return Cleared()
    if isinstance(kind, str):
        return None  # an event kind this gateway does not know: skip it
    raise WireError("an event must be a tagged map or an array with its tag first")


def decode_batch(payload: bytes) -> Batch:
    try:
        raw = _DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"not msgpack: {exc}") from None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    else:
        raise WireError("a batch must be [ts, events, data_parallel_rank]")
    if not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise WireError("a batch needs a numeric ts and a list of events")
    out = [e for e in map(_event, events) if e is not None]
    return Batch(float(ts), out, rank if isinstance(rank, int) else None)
