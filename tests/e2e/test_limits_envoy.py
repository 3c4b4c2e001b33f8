"""Token limits through Envoy: two sidecar replicas on one Redis hold one budget, settled from the
usage the sidecar reads in streamed answers (the client never asked for it)."""
from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from policies.keys import hash_key
from tests.e2e.stack import MODEL, Reply, Stack, post, sim_requests, stack

TPM = 900


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = {"auth": {"enabled": True, "redis_keys": False, "keys": [
        {"name": "shared", "sha256": hash_key("key-shared"), "tenant": "t-shared", "limits": {"tpm": TPM}},
        {"name": "other", "sha256": hash_key("key-other"), "tenant": "t-other"},
        {"name": "narrow", "sha256": hash_key("key-narrow"), "tenant": "t-other", "models": ["another-model"]}]}}
    with stack(tmp_path_factory.mktemp("limits"), sims=1, sidecars=2, policies=policies) as s:
        yield s


def _stream(st: Stack, key: str, rid: str, max_tokens: int = 120, seed: int = 1) -> Reply:
    body = {"model": MODEL, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "messages": [{"role": "user", "content": "count the tokens of this short question"}]}
    return post(st.base + "/chat/completions", body, {"authorization": f"Bearer {key}", "x-request-id": rid})


def _record(st: Stack, rid: str) -> dict[str, Any]:
    return next(r for r in sim_requests(st.sims[0].port) if r["request_id"].endswith("-" + rid))


def _extproc_requests(st: Stack) -> list[int]:
    """Streams Envoy opened to each sidecar replica (its admin /clusters counters)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{st.admin}/clusters", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return [int(line.rsplit("::", 1)[1]) for line in lines
            if line.startswith("gravity_extproc::") and line.endswith(tuple("0123456789"))
            and "::rq_total::" in line]


def test_unknown_and_missing_keys_are_401_and_a_model_outside_the_key_403(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="key-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert _stream(st, "", "nokey").status_code == 401
    client.close()
    narrow = openai.OpenAI(base_url=st.base, api_key="key-narrow", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        narrow.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-request-id": "denied-1"})
    assert denied.value.code == "model_not_allowed"
    assert all(not r["request_id"].endswith("-denied-1") for r in sim_requests(st.sims[0].port))
    narrow.close()


def test_settled_from_the_streamed_usage_the_sidecar_read(st: Stack) -> None:
    first = _stream(st, "key-other", "settle-0")  # the other key: this one's budget is untouched
    assert first.status_code == 200
    a = _stream(st, "key-shared", "settle-a", seed=3)
    assert a.status_code == 200 and b'"usage"' not in a.content  # the client did not ask for usage
    reserved_a = int(a.headers["x-gravity-reserved-tokens"])
    rec_a = _record(st, "settle-a")
    used_a = rec_a["prompt_tokens"] + rec_a["completion_tokens"]
    assert used_a < reserved_a - 20  # the answer stopped early: settling it must give tokens back
    time.sleep(1.0)  # settlements are written by a background task
    b = _stream(st, "key-shared", "settle-b", seed=3)
    assert b.status_code == 200
    remaining_b = int(b.headers["x-ratelimit-remaining-tokens"])
    reserved_b = int(b.headers["x-gravity-reserved-tokens"])
    charged_a = TPM - remaining_b - reserved_b  # plus what refilled since (TPM/60 per second)
    assert used_a - TPM / 60 * 3 <= charged_a <= used_a, (charged_a, used_a, reserved_a)


def test_two_sidecar_replicas_hold_one_budget(st: Stack) -> None:
    admitted_tokens = 0
    refused: Reply | None = None
    started = time.monotonic()
    before = _extproc_requests(st)
    for i in range(40):
        resp = _stream(st, "key-shared", f"budget-{i}", max_tokens=60, seed=100 + i)
        if resp.status_code == 429:
            refused = resp
            break
        assert resp.status_code == 200, resp.text
        rec = _record(st, f"budget-{i}")
        admitted_tokens += rec["prompt_tokens"] + rec["completion_tokens"]
    elapsed = time.monotonic() - started
    assert refused is not None, "the budget was never exhausted"
    after = _extproc_requests(st)
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)  # both replicas served
    # One budget across both replicas: what was admitted fits in it, give or take the refill and
    # one request's reservation (a request is admitted while its reservation fits).
    assert admitted_tokens <= TPM + TPM / 60 * elapsed + 60 + 40
    body = refused.json()["error"]
    assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
    assert "x-ratelimit-limit-tokens" in refused.headers and "x-ratelimit-remaining-tokens" in refused.headers
    assert body["type"] and body["code"]
