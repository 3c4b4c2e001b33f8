"""The KV-event subscriber over real ZMQ sockets: in-order apply, replayed gaps, resyncs, restarts, late joins."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

import pytest

from gateway.config import parse_config
from gateway.kv_config import BackendKVEvents, KVEventsSettings, resolve_kv_endpoint
from gateway.kv_subscriber import KVSubscriber, KVTarget, build_kv_events
from routing.kv.state import KVEventState
from simulator.kv_events import KVEventsConfig, ZmqEventPublisher, structs
from tests.support.procs import free_port

S = structs("map")


def _stored(h: int, parent: int | None = None) -> object:
    return S.BlockStored(block_hashes=[h], parent_block_hash=parent, token_ids=[h % 1000] * 16, block_size=16,
                         lora_id=None, medium="GPU", lora_name=None)


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, replay: bool) -> None:
        self.pub_port, self.replay_port = free_port(), free_port()
        cfg = KVEventsConfig(True, "zmq", f"tcp://*:{self.pub_port}",
                             f"tcp://*:{self.replay_port}" if replay else None, topic="kv")
        self.publisher = ZmqEventPublisher(cfg)
        self.state = KVEventState("engine", cold_s=60)
        ev = BackendKVEvents(endpoint=f"tcp://127.0.0.1:{self.pub_port}",
                             replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}" if replay else None, topic="kv")
        self.sub = KVSubscriber(self.state, [KVTarget("a", ev)], KVEventsSettings(replay_timeout_s=2))
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self.tasks.append(asyncio.create_task(self.publisher.serve_replay()))
        await self.sub.start()
        # PUB drops until the SUB's subscription arrives: send warm-up batches until one lands.
        for _ in range(300):
            self.publisher.publish([S.AllBlocksCleared()])
            await asyncio.sleep(0.01)
            if self.state.fed("a"):
                break
        await _until(lambda: self.state.fed("a"))
        await asyncio.sleep(0.05)
        # The warm-up's first batches were lost to the slow join (a late-join resync): start clean.
        ep = self.state.endpoint("a")
        assert ep is not None
        ep.resyncs = ep.replays = ep.restarts = 0
        ep.cold_until = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.stop()
        for t in self.tasks:
            t.cancel()
        self.publisher.close()

    def held(self) -> set[int]:
        return {k for k in range(1, 100) if "a" in self.state.index.holders(k)}


async def test_batches_apply_in_order() -> None:
    async with Rig(replay=False) as rig:
        rig.publisher.publish([_stored(1), _stored(2, 1)])
        rig.publisher.publish([S.BlockRemoved(block_hashes=[1], medium="GPU")])
        await _until(lambda: rig.held() == {2})


async def test_a_gap_is_replayed_from_the_router_socket() -> None:
    async with Rig(replay=True) as rig:
        rig.publisher.drop_next = 2  # lost on the PUB socket, kept in the replay buffer
        rig.publisher.publish([_stored(1)])
        rig.publisher.publish([_stored(2, 1)])
        rig.publisher.publish([_stored(3, 2)])
        await _until(lambda: rig.held() == {1, 2, 3})
        ep = rig.state.endpoint("a")
        assert ep is not None and ep.replays == 1 and ep.resyncs == 0 and not rig.state.cold("a")


async def test_a_gap_without_replay_resyncs_and_marks_cold() -> None:
    async with Rig(replay=False) as rig:
        rig.publisher.publish([_stored(1)])
        await _until(lambda: rig.held() == {1})
        rig.publisher.drop_next = 1
        rig.publisher.publish([_stored(2, 1)])
        rig.publisher.publish([_stored(3, 2)])
        await _until(lambda: rig.held() == {3})  # what came before the gap is dropped, the rest kept
        ep = rig.state.endpoint("a")
        assert ep is not None and ep.resyncs == 1 and rig.state.cold("a")


async def test_engine_restart_clears_the_endpoint() -> None:
    async with Rig(replay=True) as rig:
        rig.publisher.publish([_stored(1)])
        await _until(lambda: rig.held() == {1})
        rig.publisher.restart()
        rig.publisher.publish([_stored(5)])
        await _until(lambda: rig.held() == {5})
        ep = rig.state.endpoint("a")
        assert ep is not None and ep.restarts == 1


async def test_all_blocks_cleared_empties_the_endpoint_and_is_counted() -> None:
    async with Rig(replay=True) as rig:
        ep = rig.state.endpoint("a")
        assert ep is not None
        clears = ep.clears
        rig.publisher.publish([_stored(1), _stored(2, 1)])
        await _until(lambda: rig.held() == {1, 2})
        rig.publisher.publish([S.AllBlocksCleared(), _stored(3)])  # cleared, then a new block in the same batch
        await _until(lambda: rig.held() == {3})
        assert ep.clears == clears + 1 and ep.resyncs == 0 and not rig.state.cold("a")


async def test_late_join_replays_from_zero_when_the_buffer_reaches_back() -> None:
    pub_port, replay_port = free_port(), free_port()
    publisher = ZmqEventPublisher(KVEventsConfig(True, "zmq", f"tcp://*:{pub_port}", f"tcp://*:{replay_port}"))
    replay_task = asyncio.create_task(publisher.serve_replay())
    for h in (1, 2, 3):
        publisher.publish([_stored(h)])  # nobody listening yet
    state = KVEventState("engine")
    sub = KVSubscriber(state, [KVTarget("a", BackendKVEvents(endpoint=f"tcp://127.0.0.1:{pub_port}",
                                                             replay_endpoint=f"tcp://127.0.0.1:{replay_port}"))],
                       KVEventsSettings())
    await sub.start()
    try:
        for _ in range(300):
            publisher.publish([S.BlockRemoved(block_hashes=[99], medium="GPU")])
            await asyncio.sleep(0.01)
            if state.fed("a"):
                break
        await _until(lambda: all("a" in state.index.holders(h) for h in (1, 2, 3)))
        assert not state.cold("a")
    finally:
        await sub.stop()
        replay_task.cancel()
        publisher.close()


async def test_garbage_is_counted_not_fatal() -> None:
    async with Rig(replay=False) as rig:
        ep = rig.state.endpoint("a")
        assert ep is not None
        # Raw frames on the rig's own PUB socket: a batch that is not msgpack.
        rig.publisher._pub.send_multipart([b"kv", (10_000).to_bytes(8, "big"), b"\xc1garbage"])
        await _until(lambda: ep.decode_errors == 1)
        rig.publisher.restart()
        rig.publisher.publish([_stored(7)])
        await _until(lambda: rig.held() == {7})


def test_config_per_backend_and_derived_for_fleets() -> None:
    cfg = parse_config({
        "kv_events": {"port": 5557, "replay_port": 5558, "topic": "kv"},
        "backends": [{"name": "a", "url": "http://10.1.2.3:8000"},
                     {"name": "b", "url": "http://b:8000", "kv_events": {"endpoint": "tcp://b-events:6000"}}],
    })
    state, sub = build_kv_events(cfg)
    assert state is not None and sub is not None
    assert [(t.name, t.events.endpoint, t.events.replay_endpoint) for t in sub.targets] == [
        ("a", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558"), ("b", "tcp://b-events:6000", None)]
    assert build_kv_events(parse_config({"backends": [{"name": "a", "url": "http://a:1"}]})) == (None, None)
    assert resolve_kv_endpoint("http://a:1", None, KVEventsSettings()) is None
    from gateway.config import ConfigError

    # The index's memory cap comes from the config, and holds whatever the engines publish.
    capped, _ = build_kv_events(parse_config({"kv_events": {"port": 5557, "max_keys": 64},
                                              "backends": [{"name": "a", "url": "http://a:1"}]}))
    assert capped is not None and capped.index.max_keys == 64
    from routing.kv.wire import Batch, Stored

    for i in range(10):  # 10 chains of 16 blocks: 160 keys offered
        capped.apply("a", Batch(0.0, [Stored(list(range(i * 100, i * 100 + 16)), None,
                                             [i] * 256, 16)]))
    assert len(capped.index) == 64 and capped.index.count("a") == 64
    assert capped.describe()["evicted_by_cap"] == 96
    with pytest.raises(ConfigError, match=r"backends\[0\]\.kv_events\.endpoint"):
        parse_config({"backends": [{"name": "a", "url": "http://a:1", "kv_events": {"endpoint": "http://a:5557"}}]})
