"""KV events: bytes as vLLM's own classes encode them, events that track the cache exactly, real ZMQ."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from routing.kv.wire import Cleared, Removed, Stored, decode_batch
from simulator.engine import Engine, EngineConfig, SimRequest
from simulator.kv_events import END_SEQ, KVEventRecorder, KVEventsConfig, ZmqEventPublisher, structs
from simulator.virtual import replay
from simulator.vllm_hash import VllmBlockHasher, to_int_hash
from tests.support.procs import free_port

WIRE: dict[str, Any] = json.loads((Path(__file__).parent / "vllm_vectors.json").read_text())["wire"]


def test_current_layout_is_byte_identical_to_vllm() -> None:
    v = WIRE["current"]
    s = structs("map")
    batch = s.EventBatch(ts=v["ts"], events=[s.BlockStored(**v["stored"]), s.BlockRemoved(**v["removed"]),
                                             s.AllBlocksCleared()], data_parallel_rank=0)
    assert msgspec.msgpack.encode(batch).hex() == v["payload_hex"]


@pytest.mark.parametrize("which", ["current", "legacy"])
def test_both_vllm_layouts_decode(which: str) -> None:
    v = WIRE[which]
    batch = decode_batch(bytes.fromhex(v["payload_hex"]))
    assert batch.ts == v["ts"] and batch.data_parallel_rank == 0
    stored, removed, cleared = batch.events
    assert stored == Stored([11, 22], None, list(range(32)), 16, None, "GPU", v["stored"].get("extra_keys"))
    assert removed == Removed([22], "GPU") and cleared == Cleared()


def test_array_layout_puts_the_tag_first_then_fields_in_order() -> None:
    s = structs("array")
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(s.EventBatch(ts=1.0, events=[
        s.BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[7] * 16, block_size=16, lora_id=None,
                      medium="GPU", lora_name=None)])))
    assert raw[0] == 1.0 and raw[1][0][:5] == ["BlockStored", [1], None, [7] * 16, 16]
    assert decode_batch(msgspec.msgpack.encode(raw)).events[0].block_hashes == [1]


class _Collect:
    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self._enc = msgspec.msgpack.Encoder()
        self._s = structs("map")

    def __call__(self, events: list[Any]) -> None:
        self.batches.append(self._enc.encode(self._s.EventBatch(ts=0.0, events=events, data_parallel_rank=0)))


def _apply(batches: list[bytes], held: set[int]) -> None:
    for payload in batches:
        for ev in decode_batch(payload).events:
            if isinstance(ev, Stored):
                held.update(ev.block_hashes)
            elif isinstance(ev, Removed):
                held.difference_update(ev.block_hashes)
            else:
                held.clear()


@pytest.mark.parametrize("algo", ["sha256", "xxhash_cbor"])
def test_events_replayed_equal_the_engine_cache_under_eviction_and_preemption(algo: str) -> None:
    hasher = VllmBlockHasher.create(algo, env={"PYTHONHASHSEED": "1"})
    sink = _Collect()
    rec = KVEventRecorder(sink, external=to_int_hash, event_extra_keys=hasher.event_extra_keys)
    # A small cache and many shared prefixes force evictions; a tiny batch budget forces preemption.
    cfg = EngineConfig(kv_blocks=64, block_size=16, max_num_seqs=6, max_num_batched_tokens=96, max_model_len=1024)
    engine = Engine(cfg, block_hasher=hasher, kv_events=rec)
    rng = random.Random(3)
    prefixes = [[rng.randrange(50_000) for _ in range(rng.randint(40, 200))] for _ in range(8)]
    reqs = [SimRequest(f"r{i}", rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(rng.randint(1, 40))],
                       rng.randint(1, 30), arrival=i * 0.003, cache_salt=rng.choice([None, "s"]),
                       lora=rng.choice([None, "a"])) for i in range(150)]
    replay(engine, reqs)
    assert engine.stats().num_preemptions_total > 0
    held: set[int] = set()
    _apply(sink.batches, held)
    truth = {to_int_hash(h) for h in engine.kv._cached}
    assert held == truth and len(truth) > 10
    removed = sum(isinstance(e, Removed) for b in sink.batches for e in decode_batch(b).events)
    assert removed > 0
    # Every stored block names the hash vLLM would compute for its tokens.
    for payload in sink.batches[:20]:
        for ev in decode_batch(payload).events:
            if isinstance(ev, Stored) and ev.parent_block_hash is None:
                salt = ev.extra_keys[0][-1] if ev.extra_keys and ev.extra_keys[0] and ev.extra_keys[0][-1] == "s" else None
                lora = ev.lora_name
                want = hasher.extend([], ev.token_ids, 16, salt, lora)
                assert [to_int_hash(h) for h in want] == ev.block_hashes
    assert engine.reset_cache()
    _apply(sink.batches[-1:], held)
    assert held == set() and isinstance(decode_batch(sink.batches[-1]).events[-1], Cleared)


def test_kv_events_config_parses_vllm_json_and_refuses_typos() -> None:
    cfg = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",'
                                   ' "topic": "kv-events", "replay_endpoint": "tcp://*:5558"}')
    assert cfg.active and cfg.topic == "kv-events" and cfg.replay_endpoint == "tcp://*:5558"
    assert not KVEventsConfig.from_json('{"enable_kv_cache_events": false}').active
    with pytest.raises(ValueError, match="unknown keys"):
        KVEventsConfig.from_json('{"enable_kv_cache_event": true}')
    with pytest.raises(ValueError, match="publisher"):
        KVEventsConfig.from_json('{"enable_kv_cache_events": true, "publisher": "kafka"}')


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_pub_frames_replay_and_restart_over_real_zmq(layout: str) -> None:
    pub_port, replay_port = free_port(), free_port()
    cfg = KVEventsConfig(True, "zmq", f"tcp://*:{pub_port}", f"tcp://*:{replay_port}", topic="kv")
    publisher = ZmqEventPublisher(cfg, layout=layout, clock=lambda: 5.0)
    task = asyncio.create_task(publisher.serve_replay())
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    s = structs(layout)
    try:
        # PUB drops until the subscription propagates: publish until the first one lands.
        for _ in range(200):
            publisher.publish([s.AllBlocksCleared()])
            if await sub.poll(20):
                break
        topic, seq, payload = await sub.recv_multipart()
        assert topic == b"kv" and len(seq) == 8 and decode_batch(payload).ts == 5.0
        first = int.from_bytes(seq, "big")
        for _ in range(3):
            publisher.publish([s.BlockRemoved(block_hashes=[9], medium="GPU")])
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        await dealer.send_multipart([b"", (first + 1).to_bytes(8, "big")])
        got = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert frames[0] == b""
            body = frames[1:]
            if layout == "map":
                assert len(body) == 3  # (topic, seq, payload), as vLLM 0.33 replies
                body = body[1:]
            seq_i = int.from_bytes(body[0], "big", signed=True)
            if body[0] == END_SEQ:
                break
            got.append(seq_i)
        assert got == list(range(first + 1, publisher.published))
        dealer.close(0)
        publisher.restart()
        publisher.publish([s.AllBlocksCleared()])
        while True:
            _, seq, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
            if int.from_bytes(seq, "big") == 0:
                break  # sequence numbers start again after a restart
    finally:
        task.cancel()
        sub.close(0)
        ctx.term()
        publisher.close()
