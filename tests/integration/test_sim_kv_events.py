"""`gravity sim --kv-events-config`: a real simulator process publishes vLLM KV events over ZMQ."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
import zmq
import zmq.asyncio

from routing.kv.wire import Stored, decode_batch
from simulator.vllm_hash import VllmBlockHasher
from tests.support.procs import Proc, free_port

MODEL = "sim-llama"


def _sim(tmp: Path, pub: int, replay: int, algo: str, layout: str) -> Proc:
    port = free_port()
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
           "topic": "kv-events", "replay_endpoint": f"tcp://*:{replay}"}
    args = [sys.executable, "-m", "gateway", "sim", "--port", str(port), "--model", MODEL, "--profile", "tiny",
            "--kv-events-config", json.dumps(cfg), "--prefix-caching-hash-algo", algo, "--kv-events-layout", layout]
    return Proc(args, port, tmp / f"sim-{port}.log").start(env={"PYTHONHASHSEED": "7"})


@pytest.mark.parametrize(("algo", "layout"), [("sha256", "map"), ("xxhash_cbor", "array")])
async def test_chat_request_publishes_the_blocks_vllm_would_name(tmp_path: Path, algo: str, layout: str) -> None:
    pub, replay = free_port(), free_port()
    sim = _sim(tmp_path, pub, replay, algo, layout)
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sub.connect(f"tcp://127.0.0.1:{pub}")
    base = f"http://127.0.0.1:{sim.port}"
    messages = [{"role": "system", "content": "You route requests. " * 40}, {"role": "user", "content": "hi"}]
    try:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/tokenize", json={"model": MODEL, "messages": messages}) as r:
                ids = (await r.json())["tokens"]
            body = {"model": MODEL, "messages": messages, "max_tokens": 2, "ignore_eos": True, "cache_salt": "t1"}
            async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
            stored: list[int] = []
            seqs: list[int] = []
            while len(stored) < len(ids) // 16:
                topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
                assert topic == b"kv-events"
                seqs.append(int.from_bytes(seq, "big"))
                for ev in decode_batch(payload).events:
                    if isinstance(ev, Stored):
                        assert ev.block_size == 16 and ev.medium == "GPU"
                        stored += ev.block_hashes
            hasher = VllmBlockHasher.create(algo, env={"PYTHONHASHSEED": "7"})
            want = [hasher.external(h) for h in hasher.extend([], ids, 16, cache_salt="t1")]
            assert stored == want
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            # A restart (new engine) starts the sequence again at 0.
            async with http.post(f"{base}/admin/reset") as r:
                assert r.status == 200
            async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                assert r.status == 200
            while True:  # batches the old engine sent after the loop above may still be queued
                _, seq, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
                if int.from_bytes(seq, "big") == 0:
                    break
    finally:
        sub.close(0)
        ctx.term()
        sim.stop()
