"""Slow and silent clients are closed while everyone else is served (issue 9 item 12).

A real gateway process with tight `server.limits`; raw sockets play the slow clients (slowloris
heads, trickled bodies, idle keep-alives, a connection flood) and the openai SDK the good ones.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import openai
import pytest

from tests.support.procs import Proc, start_gateway, start_redis, start_sim

pytestmark = [pytest.mark.slow, pytest.mark.both_stacks]

HEADER_S, BODY_S, IDLE_S, MAX_CONN = 4.0, 1.0, 1.5, 80


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, gateway_stack: str) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("limits")
    redis = start_redis(tmp)
    sim = start_sim(tmp, extra=["--profile", "tiny"])
    cfg = {"server": {"limits": {"header_timeout_s": HEADER_S, "body_timeout_s": BODY_S,
                                 "idle_timeout_s": IDLE_S, "max_connections": MAX_CONN}},
           "backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": ["sim-llama"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}}
    proc = start_gateway(tmp, cfg)
    try:
        yield proc
    finally:
        for p in (proc, sim, redis):
            p.stop()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bool, bytes]:
    """(closed by the server, what it sent before closing)."""
    got = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(4096):
                got += chunk
            return True, got
    except (ConnectionResetError, BrokenPipeError):
        return True, got  # closed while the client still wrote: the kernel resets, the answer may be lost
    except TimeoutError:
        return False, got


def test_slow_heads_are_closed_while_others_are_served(gw: Proc) -> None:
    async def slowloris(port: int) -> tuple[bool, bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
        try:
            for i in range(len(head)):
                if reader.at_eof():
                    break
                writer.write(head[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.15)
                if time.monotonic() - started > HEADER_S * 4:
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        closed, got = await _closed_within(reader, HEADER_S * 3)
        writer.close()
        return closed, got, time.monotonic()

    async def good(client: openai.AsyncOpenAI) -> float:
        reply = await client.chat.completions.create(model="sim-llama", max_tokens=3,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        return time.monotonic()

    async def go() -> tuple[list[tuple[bool, bytes, float]], list[float], float]:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        started = time.monotonic()
        slow = [asyncio.create_task(slowloris(gw.port)) for _ in range(50)]
        await asyncio.sleep(0.3)
        served = [await good(client) for _ in range(5)]
        results = await asyncio.gather(*slow)
        await client.close()
        return results, served, started

    results, served, started = asyncio.run(go())
    assert all(closed for closed, _, _ in results), "a slow head was never closed"
    assert all(got.startswith(b"HTTP/1.1 408") for _, got, _ in results if got), results[0]
    closed_at = [at - started for _, _, at in results]
    assert max(closed_at) < HEADER_S * 3, closed_at
    # Served while the slow connections were still held, not after the gateway got rid of them.
    assert max(served) < min(at for _, _, at in results), (served, closed_at)


def test_a_trickled_body_gets_408(gw: Proc) -> None:
    async def go() -> tuple[bool, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 500\r\n\r\n{")
        await writer.drain()
        started = time.monotonic()
        # A byte every 0.3 s: never silent, never done. Stop writing once the answer arrived.
        while time.monotonic() - started < BODY_S * 3 and not reader.at_eof():
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                writer.write(b" ")
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.readexactly(1)
                    break
        result = await _closed_within(reader, BODY_S * 3)
        writer.close()
        return result

    _closed, got = asyncio.run(go())
    got = b"H" + got  # the loop above consumed the first byte
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b'"code":"request_timeout"' in got


def test_idle_keep_alive_connections_are_closed(gw: Proc) -> None:
    async def go() -> tuple[bytes, bool, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        first = await reader.readuntil(b"}")
        started = time.monotonic()
        closed, _ = await _closed_within(reader, IDLE_S * 3)
        writer.close()
        return first, closed, time.monotonic() - started

    first, closed, took = asyncio.run(go())
    assert first.startswith(b"HTTP/1.1 200")
    assert closed and IDLE_S * 0.8 < took < IDLE_S * 2.5, took


def test_connections_past_the_cap_get_503_and_the_gateway_recovers(gw: Proc) -> None:
    async def go() -> tuple[bytes, bool]:
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(MAX_CONN)]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        _closed, refused = await _closed_within(reader, 2)
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.3)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        reply = await client.chat.completions.create(model="sim-llama", max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])
        await client.close()
        return refused, bool(reply.choices[0].message.content)

    refused, ok = asyncio.run(go())
    assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused, refused
    assert ok
