"""Admission and the session lookup cost one Redis round trip before dispatch (issue 9 item 7).

A real redis-server; the gateway's own parts built by `build_core`, driven through the pipeline.
"""
from __future__ import annotations

import orjson

from gateway.config import parse_config
from gateway.core import build_core
from gateway.openai_requests import parse_body
from policies.keys import hash_key
from tests.support.procs import Proc


async def test_the_reservation_and_the_session_lookup_leave_in_one_write(redis_server: Proc) -> None:
    cfg = parse_config({
        "state": {"redis_url": f"redis://127.0.0.1:{redis_server.port}/0"},
        "backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["m"]}],
        "policies": {"auth": {"enabled": True, "keys": [
            {"name": "k", "sha256": hash_key("sk"), "tenant": "t", "limits": {"tpm": 100_000, "concurrency": 5}}]}},
    })
    core = build_core(cfg)
    await core.start()
    try:
        headers = {"authorization": "Bearer sk", "x-session-id": "s-1"}
        raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
        assert core.redis is not None and core.redis.pipe is not None
        for i in range(3):
            ex = core.pipeline.exchange("chat/completions", parse_body("chat/completions", raw), raw, headers,
                                        f"r{i}", {})
            before = core.redis.pipe.writes
            key = await core.pipeline.authenticate(ex, headers)
            await core.pipeline.reserve(ex, key)
            assert core.redis.pipe.writes - before == 1, "the reservation and the session lookup took two trips"
            assert "x-ratelimit-remaining-tokens" in ex.response_headers
            ex.backend = "b"
            await core.pipeline.picked(ex)  # remembers the session's endpoint (after dispatch: not counted)
            ex.outcome = "ok"
            await core.pipeline.finish(ex)
        assert ex.routing.session_endpoint == "b", "the lookup found the session written by the first request"
    finally:
        await core.stop()
