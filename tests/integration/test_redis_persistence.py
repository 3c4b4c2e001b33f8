"""What survives a redis-server crash (SIGKILL, then a restart on the same files): with AOF on
(`appendonly yes`, `appendfsync everysec`, as docker-compose.yml runs it) every stored response,
conversation and spent budget; without persistence nothing, and the gateway says so with 404s and
full budgets, never a 5xx. docs/state.md states these guarantees.
"""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
import redis as redis_sync

from policies.keys import hash_key
from tests.support.procs import Proc, running, start_gateway, start_redis, start_sim

# Outage drills (kills, restarts, bursts) wait more than they compute: `make test-outage`, run by .ci/run.
pytestmark = [pytest.mark.slow, pytest.mark.outage]

MODEL = "sim-llama"
RPM = 5
AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]


def _chat(c: openai.OpenAI) -> int:
    try:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def _until_redis_answers(c: openai.OpenAI) -> None:
    """The first limiter call after the crash meets a dead connection (a 503 with failure_mode closed);
    wait until Redis decides again, so the next answer is Redis's and not an outage's."""
    deadline = time.monotonic() + 10
    while _chat(c) != 200:
        assert time.monotonic() < deadline, "the limiter never reached the restarted Redis"
        time.sleep(0.3)


@pytest.mark.parametrize("persistence", ["aof", "none"])
def test_what_a_redis_crash_keeps(tmp_path: Path, persistence: str) -> None:
    extra = AOF if persistence == "aof" else []
    redis = start_redis(tmp_path, extra=extra)
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    keys = [{"name": "app", "sha256": hash_key("key-app"), "tenant": "t", "limits": {"tpm": 10_000_000}},
            {"name": "capped", "sha256": hash_key("key-capped"), "tenant": "t", "limits": {"rpm": RPM}}]
    cfg = {"backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "policies": {"auth": {"enabled": True, "redis_keys": False, "keys": keys},
                        "rate_limits": {"failure_mode": "closed", "redis_retry_s": 0.2}}}
    gateway = start_gateway(tmp_path, cfg)
    base = f"http://127.0.0.1:{gateway.port}/v1"
    app = openai.OpenAI(base_url=base, api_key="key-app", max_retries=0)
    capped = openai.OpenAI(base_url=base, api_key="key-capped", max_retries=0)
    restarted: Proc | None = None
    with running(gateway, sim):
        try:
            first = app.responses.create(model=MODEL, input="remember this", max_output_tokens=4)
            conv = app.conversations.create()
            app.responses.create(model=MODEL, input="in a conversation", conversation=conv.id, max_output_tokens=4)
            assert [_chat(capped) for _ in range(RPM + 1)] == [200] * RPM + [429]  # the budget is spent
            time.sleep(0.1)  # the last settlements are queued for at most settle_interval_ms
            redis.kill()  # a crash: no SHUTDOWN, no final save
            restarted = start_redis(tmp_path, port=redis.port, extra=extra)
            _until_redis_answers(app)
            if persistence == "aof":
                assert app.responses.retrieve(first.id).id == first.id
                items = app.conversations.items.list(conv.id, order="asc").data
                assert [i.role for i in items if i.type == "message"] == ["user", "assistant"]  # type: ignore[union-attr]
                nxt = app.responses.create(model=MODEL, input="and then?", previous_response_id=first.id,
                                           max_output_tokens=4)
                assert nxt.previous_response_id == first.id
                assert _chat(capped) == 429  # the spent budget is still spent
            else:
                with pytest.raises(openai.NotFoundError):
                    app.responses.retrieve(first.id)
                with pytest.raises(openai.NotFoundError):
                    app.responses.create(model=MODEL, input="and then?", previous_response_id=first.id,
                                         max_output_tokens=4)
                with pytest.raises(openai.NotFoundError):
                    app.conversations.retrieve(conv.id)
                # A lost bucket reads as full: the budget starts again (one more limit's worth).
                assert [_chat(capped) for _ in range(RPM + 1)] == [200] * RPM + [429]
        finally:
            (restarted or redis).stop()


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_a_full_redis_keeps_state_only_without_eviction(tmp_path: Path, policy: str) -> None:
    """Redis full of other data: under noeviction what the gateway stored stays (writes past the
    limit are refused with 503s, or let through by Redis); under an eviction policy it is dropped."""
    redis = start_redis(tmp_path, extra=["--maxmemory", "8mb", "--maxmemory-policy", policy])
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    keys = [{"name": "app", "sha256": hash_key("key-app"), "tenant": "t"},
            {"name": "capped", "sha256": hash_key("key-capped"), "tenant": "t", "limits": {"rpm": RPM}}]
    cfg = {"backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "policies": {"auth": {"enabled": True, "redis_keys": False, "keys": keys},
                        "rate_limits": {"failure_mode": "closed", "redis_retry_s": 0.2}}}
    gateway = start_gateway(tmp_path, cfg)
    base = f"http://127.0.0.1:{gateway.port}/v1"
    app = openai.OpenAI(base_url=base, api_key="key-app", max_retries=0)
    capped = openai.OpenAI(base_url=base, api_key="key-capped", max_retries=0)
    with running(gateway, sim, redis):
        first = app.responses.create(model=MODEL, input="remember this", max_output_tokens=4)
        assert [_chat(capped) for _ in range(RPM + 1)] == [200] * RPM + [429]
        filler = redis_sync.Redis(port=redis.port)
        try:
            for i in range(2_000):  # 125 MB through an 8 MB Redis
                filler.set(f"filler:{i}", b"x" * 65536)
            full = False
        except redis_sync.exceptions.OutOfMemoryError:
            full = True
        finally:
            filler.close()
        assert full == (policy == "noeviction")
        statuses = [_chat(capped) for _ in range(3)]
        if policy == "noeviction":
            assert app.responses.retrieve(first.id).id == first.id
            assert set(statuses) <= {429, 503}, statuses  # spent stays spent, or the limiter's 503
            try:
                app.responses.create(model=MODEL, input="and?", previous_response_id=first.id, max_output_tokens=4)
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and exc.code == "state_unavailable", exc
        else:
            with pytest.raises(openai.NotFoundError):
                app.responses.retrieve(first.id)
            assert statuses[0] == 200, statuses  # the spent bucket was evicted: it reads as full
