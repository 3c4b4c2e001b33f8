"""Precise prefix-cache state from vLLM's KV events: wire decoding, the block index, request keys.

No I/O here: the gateway's subscriber feeds :class:`KVBlockIndex` with decoded batches.
"""
from __future__ import annotations
