"""KV-cache events as vLLM publishes them: ``--kv-events-config`` JSON, msgspec wire structs, a ZMQ PUB
socket with a ROUTER replay socket, and the engine-facing recorder that turns cache changes into events.

Wire: three frames per batch (topic, 8-byte big-endian sequence number, msgpack ``EventBatch``); the
batch is a positional array ``[ts, events, data_parallel_rank]``. Events are maps tagged by ``"type"``
(vLLM's current layout) or, with ``layout="array"``, positional arrays with the tag first (earlier
releases). docs/kv-events.md has the details and how they were checked against vLLM's own classes.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from simulator.vllm_hash import VllmBlockHasher, to_int_hash

__all__ = ["END_SEQ", "KVEventRecorder", "KVEventsConfig", "KVEventsSetup", "Layout", "SimKVEvents", "ZmqEventPublisher", "structs"]

Layout = Literal["map", "array"]
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM_GPU = "GPU"


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``KVEventsConfig``, parsed from the same ``--kv-events-config`` JSON."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" when enabled, else "null" (vLLM's rule)
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")  # noqa: TRY004 - a usage error
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--kv-events-config: unknown keys {unknown} (known: {sorted(known)})")
        cfg = cls(**data)
        if cfg.publisher not in (None, "null", "zmq"):
            raise ValueError(f"--kv-events-config: unknown publisher {cfg.publisher!r} (null, zmq)")
        return cfg

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and (self.publisher or "zmq") == "zmq"


def _make_structs(array_like: bool) -> SimpleNamespace:
    """The event classes, field for field in vLLM's order (the order fixes the positional layout)."""

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        # Always left at their defaults here, but declared: they set the map header's width.
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None
        locality: str | None = None
        ownership: str | None = None
        session_id: str | None = None
        lookahead_token_ids: list[list[int]] | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None
        locality: str | None = None
        ownership: str | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    return SimpleNamespace(EventBatch=EventBatch, BlockStored=BlockStored, BlockRemoved=BlockRemoved,
                           AllBlocksCleared=AllBlocksCleared)


_STRUCTS = {"map": _make_structs(False), "array": _make_structs(True)}


def structs(layout: Layout) -> SimpleNamespace:
    return _STRUCTS[layout]


def python_external(h: Hashable) -> int:
    """Wire form of the engine's default (Python ``hash``) block ids: their low 64 bits."""
    return (h if isinstance(h, int) else hash(h)) & ((1 << 64) - 1)


class KVEventRecorder:
    """What the engine tells about its prefix cache, collected per step and handed on as one batch.

    The engine calls ``stored``/``removed``/``cleared`` as cache entries appear and go, and
    ``end_step`` once per step; ``emit`` receives the step's event list (nothing when it is empty).
    """

    def __init__(self, emit: Callable[[list[Any]], None], *, layout: Layout = "map",
                 external: Callable[[Any], int | bytes] = python_external,
                 event_extra_keys: Callable[[int, str | None, str | None], tuple[Any, ...] | None] | None = None,
                 lora_ids: Mapping[str, int] | None = None, medium: str = MEDIUM_GPU) -> None:
        self._emit = emit
        self._s = structs(layout)
        self._external = external
        self._extra = event_extra_keys or VllmBlockHasher().event_extra_keys
        self._lora_ids = dict(lora_ids or {})
        self._medium = medium
        self._pending: list[Any] = []

    def stored(self, hashes: Sequence[Any], start: int, end: int, token_ids: Sequence[int], block_size: int,
               cache_salt: str | None, lora: str | None) -> None:
        """Blocks ``start..end`` of a sequence (consecutive) entered the prefix cache."""
        ext = self._external
        parent = ext(hashes[start - 1]) if start > 0 else None
        self._pending.append(self._s.BlockStored(
            block_hashes=[ext(h) for h in hashes[start:end]], parent_block_hash=parent,
            token_ids=list(token_ids[start * block_size:end * block_size]), block_size=block_size,
            lora_id=self._lora_ids.get(lora) if lora is not None else None, medium=self._medium, lora_name=lora,
            extra_keys=[self._extra(i, cache_salt, lora) for i in range(start, end)], group_idx=0))

    def removed(self, h: Any) -> None:
        self._pending.append(self._s.BlockRemoved(block_hashes=[self._external(h)], medium=self._medium, group_idx=0))

    def cleared(self) -> None:
        self._pending.append(self._s.AllBlocksCleared())

    def end_step(self) -> None:
        if self._pending:
            events, self._pending = self._pending, []
            self._emit(events)


class ZmqEventPublisher:
    """PUB socket plus an optional ROUTER replay socket with the last ``buffer_steps`` batches.

    ``publish`` never blocks (PUB drops past its high-water mark, as in vLLM); ``serve_replay`` is a
    task on the event loop answering replay requests: an 8-byte big-endian start sequence in, every
    buffered batch from there out, then a ``-1`` sequence.
    """

    def __init__(self, cfg: KVEventsConfig, *, layout: Layout = "map", clock: Callable[[], float] = time.time,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.cfg = cfg
        self.layout = layout
        self._clock = clock
        self._ctx = ctx or zmq.asyncio.Context()
        self._own_ctx = ctx is None
        self._encoder = msgspec.msgpack.Encoder()
        self._batch = structs(layout).EventBatch
        self._topic = cfg.topic.encode()
        self._seq = itertools.count()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self.published = 0
        self.drop_next = 0
        """Fault switch: send the next N batches nowhere (they stay in the replay buffer), as a full HWM would."""
        # PUB is a plain socket: a NOBLOCK send never waits (it drops at the high-water mark).
        self._sync_ctx = zmq.Context()
        self._pub: zmq.Socket[bytes] = self._sync_ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if _binds(cfg.endpoint):
            self._pub.bind(cfg.endpoint)
        else:
            self._pub.connect(cfg.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        if cfg.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(cfg.replay_endpoint)

    def publish(self, events: list[Any]) -> None:
        seq = next(self._seq)
        payload = self._encoder.encode(self._batch(ts=self._clock(), events=events, data_parallel_rank=0))
        self._buffer.append((seq, payload))
        self.published += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        with contextlib.suppress(zmq.Again):  # a dropped batch is a PUB's documented behaviour
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)

    def restart(self) -> None:
        """A new engine process: sequence numbers start again at 0 and the replay buffer is empty."""
        self._seq = itertools.count()
        self._buffer.clear()

    async def serve_replay(self) -> None:
        sock = self._replay
        if sock is None:
            return
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                continue  # vLLM logs and ignores malformed requests
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big", signed=True)
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await sock.send_multipart(self._replay_frame(client, seq.to_bytes(8, "big"), payload))
            await sock.send_multipart(self._replay_frame(client, END_SEQ, b""))

    def _replay_frame(self, client: bytes, seq: bytes, payload: bytes) -> tuple[bytes, ...]:
        # vLLM 0.33 repeats the topic in replies; earlier releases sent (seq, payload) only.
        if self.layout == "map":
            return (client, b"", self._topic if payload else b"", seq, payload)
        return (client, b"", seq, payload)

    def close(self) -> None:
        self._pub.close(0)
        self._sync_ctx.term()
        if self._replay is not None:
            self._replay.close(0)
        if self._own_ctx:
            self._ctx.term()


def _binds(endpoint: str) -> bool:
    # vLLM's heuristic: bind for wildcards and ipc/inproc, connect otherwise.
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


@dataclass(frozen=True)
class KVEventsSetup:
    """The simulator flags behind KV events: vLLM's config, ``--prefix-caching-hash-algo``, the wire layout."""

    config: KVEventsConfig
    hash_algo: str = "sha256"
    layout: Layout = "map"


class SimKVEvents:
    """Everything one simulated replica needs to publish KV events: hasher, publisher, recorder factory."""

    def __init__(self, setup: KVEventsSetup, *, lora_paths: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.cfg = setup.config
        self.hasher = VllmBlockHasher.create(setup.hash_algo, env=env, lora_paths=lora_paths)
        self.publisher = ZmqEventPublisher(setup.config, layout=setup.layout)
        self._lora_ids = {name: i + 1 for i, name in enumerate(lora_paths or {})}
        self._engines = 0

    def recorder(self) -> KVEventRecorder:
        """A recorder for a new engine; every engine after the first is a restart."""
        if self._engines:
            self.publisher.restart()
        self._engines += 1
        hasher = self.hasher
        external: Callable[[Any], int | bytes] = (lambda h: to_int_hash(h)) if hasher.int_hashes else (lambda h: h)
        return KVEventRecorder(self.publisher.publish, layout=self.publisher.layout, external=external,
                               event_extra_keys=hasher.event_extra_keys, lora_ids=self._lora_ids)

    async def run(self) -> None:
        await self.publisher.serve_replay()

    def close(self) -> None:
        self.publisher.close()
