"""Tenant isolation: a stored object is visible only to the tenant of the API key that stored it."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.procs import Proc, start_gateway, start_sim

MODEL = "sim-llama"
KEYS = {"alpha": "sk-alpha-test-key", "beta": "sk-beta-test-key"}


@pytest.fixture
def clients(tmp_path: Path, redis_url: str) -> Iterator[dict[str, openai.OpenAI]]:
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny", "--time-scale", "20"])
    keys = [{"name": t, "tenant": t, "sha256": hashlib.sha256(k.encode()).hexdigest()} for t, k in KEYS.items()]
    cfg = {"state": {"redis_url": redis_url},
           "policies": {"auth": {"enabled": True, "redis_keys": False, "keys": keys}},
           "backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}]}
    gw: Proc | None = None
    try:
        gw = start_gateway(tmp_path, cfg)
        yield {t: openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=k, max_retries=0)
               for t, k in KEYS.items()}
    finally:
        if gw is not None:
            gw.stop()
        sim.stop()


def test_tenant_cannot_read_another_tenants_objects(clients: dict[str, openai.OpenAI]) -> None:
    alpha, beta = clients["alpha"], clients["beta"]
    r = alpha.responses.create(model=MODEL, input="alpha's secret", max_output_tokens=4)
    conv = alpha.conversations.create(items=[{"type": "message", "role": "user", "content": "private"}])
    assert alpha.responses.retrieve(r.id).id == r.id

    for attempt in (
        lambda: beta.responses.retrieve(r.id),
        lambda: beta.responses.input_items.list(r.id),
        lambda: beta.responses.delete(r.id),
        lambda: beta.responses.create(model=MODEL, input="continue it", previous_response_id=r.id),
        lambda: beta.conversations.retrieve(conv.id),
        lambda: beta.conversations.items.list(conv.id),
        lambda: beta.conversations.delete(conv.id),
        lambda: beta.responses.create(model=MODEL, input="join it", conversation=conv.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    # Nothing beta tried changed alpha's objects.
    assert alpha.responses.retrieve(r.id).output_text == r.output_text
    assert len(alpha.conversations.items.list(conv.id).data) == 1

    anonymous = openai.OpenAI(base_url=str(alpha.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.responses.retrieve(r.id)
