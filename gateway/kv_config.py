"""Configuration of KV-event subscriptions: per backend, or derived from every backend's URL for fleets."""
from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["BackendKVEvents", "KVEventsSettings", "resolve_kv_endpoint"]

_ZMQ = re.compile(r"^(tcp://[^\s/]+:\d+|ipc://\S+|inproc://\S+)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendKVEvents(_Model):
    """Where one backend publishes (vLLM's ``--kv-events-config`` endpoint, as seen from the gateway)."""

    endpoint: str
    """e.g. tcp://10.0.0.5:5557 (vLLM binds tcp://*:5557; the gateway connects)."""
    replay_endpoint: str | None = None
    """vLLM's ROUTER replay socket, e.g. tcp://10.0.0.5:5558; without it lost events mean a resync."""
    topic: str = ""

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq(cls, v: str | None) -> str | None:
        if v is not None and not _ZMQ.match(v):
            raise ValueError("must be a ZMQ endpoint to connect to: tcp://host:port, ipc://path or inproc://name")
        return v


class KVEventsSettings(_Model):
    """The gateway-wide part: index keying and size, and the fleet derivation."""

    mode: Literal["tokens", "engine"] = "tokens"
    """tokens: key blocks by the gateway's own hash of their token ids (llm-d's way); engine: by vLLM's
    hashes (the precise scorer must then be given the engines' hash_algo and hash_seed)."""
    max_keys: int = Field(1 << 20, ge=1)
    """Block keys kept over all endpoints (LRU past it): ~330 bytes each (docs/kv-events.md)."""
    cold_s: float = Field(30.0, ge=0)
    """After events were lost and could not be replayed, the approximate index helps out this long."""
    port: int | None = Field(None, ge=1, le=65535)
    """Subscribe every backend without its own `kv_events` at tcp://<its URL's host>:port."""
    replay_port: int | None = Field(None, ge=1, le=65535)
    topic: str = ""
    replay_timeout_s: float = Field(2.0, gt=0)


def resolve_kv_endpoint(url: str, own: BackendKVEvents | None, fleet: KVEventsSettings) -> BackendKVEvents | None:
    """A backend's subscription: its own, or the one derived from its URL, or none."""
    if own is not None:
        return own
    if fleet.port is None:
        return None
    host = urlsplit(url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    replay = f"tcp://{host}:{fleet.replay_port}" if fleet.replay_port else None
    return BackendKVEvents(endpoint=f"tcp://{host}:{fleet.port}", replay_endpoint=replay, topic=fleet.topic)
