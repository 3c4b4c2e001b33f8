"""Admission, the session lookup and the other replicas' in-flight counts cost one Redis round trip
before dispatch (issue 9 item 7, issue 13).

A real redis-server; the gateway's own parts built by `build_core`, driven through the pipeline.
"""
from __future__ import annotations

import orjson
import redis

from gateway.config import parse_config
from gateway.core import build_core
from gateway.openai_requests import parse_body
from policies.keys import hash_key
from tests.support.procs import Proc


async def test_the_reservation_the_session_lookup_and_the_inflight_read_leave_in_one_write(
        redis_server: Proc) -> None:
    # Another gateway replica, alive for an hour, with two requests in flight on backend b.
    other = redis.Redis(port=redis_server.port)
    other.hset("gravity:{inflight}", mapping={"feedc0de": str(2 ** 50), "feedc0de|b": "2 300"})
    other.close()
    cfg = parse_config({
        # No heartbeat inside the measured window: it would be a write of its own.
        "state": {"redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
                  "shared_inflight": {"heartbeat_s": 3000, "ttl_s": 6000}},
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
            assert core.redis.pipe.writes - before == 1, "admission, session and in-flight took two trips"
            assert "x-ratelimit-remaining-tokens" in ex.response_headers
            view = core.datastore.snapshot().endpoints["b"]
            assert (view.foreign_requests, view.foreign_prompt_tokens) == (2, 300), "the in-flight read was made"
            ex.backend = "b"
            await core.pipeline.picked(ex)  # remembers the session's endpoint (after dispatch: not counted)
            ex.outcome = "ok"
            await core.pipeline.finish(ex)
        assert ex.routing.session_endpoint == "b", "the lookup found the session written by the first request"
    finally:
        await core.stop()
