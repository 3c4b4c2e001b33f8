"""Routing decided by the sidecar, checked from the simulators' own request logs: prefix affinity,
session affinity, and the subset hint."""
from __future__ import annotations

import random
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.stack import MODEL, Stack, sim_requests, stack

WORDS = ["gravity", "routing", "cache", "prefix", "replica", "token", "queue", "latency", "engine", "batch"]


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("routing"), sims=3) as s:
        yield s


def _chat(st: Stack, client: openai.OpenAI, messages: list[dict[str, str]], rid: str,
          session: str | None = None) -> int:
    headers = {"x-request-id": rid, **({"x-session-id": session} if session else {})}
    reply = client.chat.completions.create(model=MODEL, max_tokens=2, messages=messages,  # type: ignore[arg-type]
                                           extra_headers=headers, extra_body={"ignore_eos": True})
    assert reply.choices
    served = st.served_by(rid)
    assert len(served) == 1, (rid, served)
    return served[0]


def test_a_shared_prefix_sticks_to_one_simulator_and_hits_its_cache(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    system = "You are a routing expert. " + " ".join(random.Random(1).choices(WORDS, k=900))
    where = [_chat(st, client, [{"role": "system", "content": system}, {"role": "user", "content": f"q {i}?"}],
                   f"prefix-{i}") for i in range(6)]
    assert len(set(where)) == 1, where
    client.close()


def test_a_session_sticks_and_different_sessions_spread(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    rng = random.Random(2)
    by_session: dict[str, set[int]] = {}
    for i in range(24):
        session = f"s{i % 6}"
        text = " ".join(rng.choices(WORDS, k=12)) + f" {i}"  # distinct prompts: no prefix affinity
        by_session.setdefault(session, set()).add(
            _chat(st, client, [{"role": "user", "content": text}], f"session-{i}", session))
    assert all(len(v) == 1 for v in by_session.values()), by_session
    assert len({next(iter(v)) for v in by_session.values()}) > 1  # sessions are not all on one replica
    client.close()


def test_the_remembered_session_outlives_the_sidecar_process(st: Stack) -> None:
    """Affinity lives in Redis, not in the sidecar: a restarted sidecar keeps routing the session."""
    from tests.e2e.stack import start_sidecar

    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    first = _chat(st, client, [{"role": "user", "content": "remember me"}], "restart-0", "durable")
    old = st.sidecars[0]
    old.stop()
    st.sidecars[0] = start_sidecar(st.tmp, st.gravity, port=old.port)
    later = [_chat(st, client, [{"role": "user", "content": f"again {i} " + "x" * i}], f"restart-{i}", "durable")
             for i in range(1, 5)]
    assert set(later) == {first}
    client.close()


@pytest.mark.parametrize("subset", [[1], "0,2", [], "127.0.0.1:1,127.0.0.2:9"])
def test_the_subset_hint_bounds_every_pick(tmp_path_factory: pytest.TempPathFactory, subset: list[int] | str) -> None:
    """The data plane's `envoy.lb.subset_hint` (set here by Envoy's set_metadata filter, as a
    list or a comma string): picks stay inside it; an empty one, or one naming no endpoint of the
    pool, is a 503."""
    with stack(tmp_path_factory.mktemp("subset"), sims=3, subset=subset) as st:
        client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
        allowed = {int(i) for i in (subset if isinstance(subset, list) else subset.split(",")) if str(i).isdigit()}
        if not allowed:
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model=MODEL, prompt="anyone?", max_tokens=2)
            assert refused.value.status_code == 503
            assert refused.value.code == "no_healthy_backend"
            assert refused.value.response.headers["retry-after"] == "1"
            assert all(sim_requests(s.port) == [] for s in st.sims)
        else:
            where = {_chat(st, client, [{"role": "user", "content": f"subset {i} " + "w " * (i * 40)}],
                           f"subset-{i}") for i in range(8)}
            assert where <= allowed, (where, allowed)
        client.close()
