"""The Responses API through Envoy: not an inference route Envoy can route (the body must become
a chat completion with history from Redis, and the answer a Response), so the sidecar answers it
itself with the gateway's own code, state in Redis shared with every other replica."""
from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.stack import MODEL, Stack, stack


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("responses"), sims=2, sidecars=2) as s:
        yield s


def test_a_conversation_continues_across_sidecar_replicas(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    first = client.responses.create(model=MODEL, input="Remember the word: gravity.", max_output_tokens=4)
    # max_output_tokens may end a turn first: "incomplete" is as valid an answer here
    assert first.status in ("completed", "incomplete") and first.output_text
    ids = [first.id]
    for turn in range(3):  # Envoy spreads these over both sidecar replicas
        nxt = client.responses.create(model=MODEL, input=f"turn {turn}", previous_response_id=ids[-1],
                                      max_output_tokens=4)
        assert nxt.status in ("completed", "incomplete")
        ids.append(nxt.id)
    stored = client.responses.retrieve(ids[-1])
    assert stored.id == ids[-1] and stored.output_text == nxt.output_text
    items = client.responses.input_items.list(ids[-1])
    assert [i.type for i in items.data][:1] == ["message"]
    # The last turn reached a backend with the whole history: 4 user turns, 3 assistant answers.
    from tests.e2e.stack import sim_requests

    last = max((r for s in st.sims for r in sim_requests(s.port)), key=lambda r: r["timings"]["received_at"])
    roles = [m["role"] for m in last["messages"]]
    assert roles.count("user") == 4 and roles.count("assistant") == 3
    client.responses.delete(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    client.close()


def test_a_streamed_response_arrives_whole_and_complete(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    events = list(client.responses.create(model=MODEL, input="stream it", max_output_tokens=4, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert any(t == "response.output_text.delta" for t in types)
    client.close()
