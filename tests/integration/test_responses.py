"""The Responses API through the gateway with the openai SDK: real simulators and redis-server."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.procs import Proc, sim_fleet

MODEL = "sim-llama"
SIM = ["--profile", "tiny", "--time-scale", "20"]
MAX_ITEM_BYTES = 4096
MAX_ITEMS = 12


class Stack:
    def __init__(self, gateway: Proc, sims: list[Proc]) -> None:
        self.base = f"http://127.0.0.1:{gateway.port}"
        self.sims = [f"http://127.0.0.1:{s.port}" for s in sims]

    def records(self) -> list[dict[str, Any]]:
        """Every simulator's request records (roles and tool-call ids, no prompt text)."""
        out: list[dict[str, Any]] = []
        for sim in self.sims:
            out += _call("GET", sim + "/admin/requests")[1]["requests"]  # type: ignore[arg-type]
        return out

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = {"max_item_bytes": MAX_ITEM_BYTES, "max_conversation_items": MAX_ITEMS}
    server = {"debug_headers": True, "max_body_bytes": 64 * 1024}
    with sim_fleet(tmp_path_factory.mktemp("responses"), sim_args=SIM, server=server, state=state) as fleet:
        yield Stack(fleet.gateway, fleet.sims)


def test_previous_response_id_rebuilds_history_from_redis(stack: Stack) -> None:
    c = stack.client()
    raw1 = c.responses.with_raw_response.create(model=MODEL, instructions="Be brief.", max_output_tokens=16,
                                                input="Tell me about data gravity.", metadata={"k": "v"})
    r1 = raw1.parse()
    assert r1.status in ("completed", "incomplete") and r1.output_text and r1.metadata == {"k": "v"}
    assert r1.id.startswith("resp_") and len(r1.id) == 5 + 32
    raw2 = c.responses.with_raw_response.create(model=MODEL, instructions="Be brief.", max_output_tokens=16,
                                                input="And then?", previous_response_id=r1.id)
    r2 = raw2.parse()
    assert r1.usage is not None and r2.usage is not None
    # The backend saw the whole history: first input, first output, then the new turn.
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.previous_response_id == r1.id
    if raw1.headers["x-gravity-backend"] == raw2.headers["x-gravity-backend"]:
        # The rebuilt prefix is byte-identical, so the backend's prefix cache hits.
        assert r2.usage.input_tokens_details.cached_tokens > 0

    got = c.responses.retrieve(r2.id)
    assert got.output_text == r2.output_text and got.usage == r2.usage
    items = c.responses.input_items.list(r2.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "And then?"  # type: ignore[union-attr]

    c.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError, match="incomplete"):
        c.responses.create(model=MODEL, input="again", previous_response_id=r2.id)


def test_stream_emits_the_responses_event_sequence_and_stores_the_result(stack: Stack) -> None:
    c = stack.client()
    first = c.responses.create(model=MODEL, input="Say something.", max_output_tokens=8)
    events = list(c.responses.create(model=MODEL, input="Stream please.", max_output_tokens=24, stream=True,
                                     previous_response_id=first.id, extra_body={"ignore_eos": True}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == 24
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert final.output_text == text
    # Stored before the terminal event: retrievable and continuable at once.
    assert c.responses.retrieve(final.id).output_text == text
    assert c.responses.create(model=MODEL, input="more", previous_response_id=final.id,
                              max_output_tokens=4).status in ("completed", "incomplete")


def test_store_false_is_not_retrievable(stack: Stack) -> None:
    c = stack.client()
    r = c.responses.create(model=MODEL, input="ephemeral", store=False, max_output_tokens=4)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_function_call_items_round_trip(stack: Stack) -> None:
    c = stack.client()
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    r = c.responses.create(model=MODEL, tools=tools, max_output_tokens=8, input=[  # type: ignore[arg-type]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ])
    assert r.tools[0].name == "get_weather"  # type: ignore[union-attr]
    kinds = [i.type for i in c.responses.input_items.list(r.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output"]


def test_conversation_appends_input_and_output(stack: Stack) -> None:
    c = stack.client()
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
                                  metadata={"topic": "names"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "names"}
    r1 = c.responses.create(model=MODEL, input="Hello!", conversation=conv.id, max_output_tokens=8)
    r2 = c.responses.create(model=MODEL, input="Again!", conversation={"id": conv.id}, max_output_tokens=8)
    assert r1.conversation is not None and r1.conversation.id == conv.id
    assert r2.usage is not None and r1.usage is not None
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    items = c.conversations.items.list(conv.id, order="asc", limit=100).data
    assert [(i.role, i.type) for i in items] == [("user", "message"), ("user", "message"),  # type: ignore[union-attr]
                                                 ("assistant", "message"), ("user", "message"),
                                                 ("assistant", "message")]
    assert items[2].content[0].text == r1.output_text  # type: ignore[union-attr]

    page = c.conversations.items.list(conv.id, limit=2)  # newest first by default
    assert [i.id for i in page.data] == [items[4].id, items[3].id] and page.has_more
    page2 = c.conversations.items.list(conv.id, limit=2, after=page.data[-1].id)
    assert [i.id for i in page2.data] == [items[2].id, items[1].id]

    added = c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}])
    assert c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id).id == added.data[0].id
    assert c.conversations.items.delete(added.data[0].id, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)

    assert c.conversations.update(conv.id, metadata={"topic": "other"}).metadata == {"topic": "other"}
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "other"}
    assert c.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="gone?", conversation=conv.id)


def _call(method: str, url: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
    async def go() -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as s, s.request(method, url, data=body,
                                                           headers={"content-type": "application/json"}) as r:
            return r.status, await r.json()
    return asyncio.run(go())


def _post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    return _call("POST", url, body)


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, "invalid_json"),
    (b'{"model": "sim-llama"}', 400, "input", "missing_required_parameter"),
    (b'{"model": "sim-llama", "input": 42}', 400, "input", "invalid_type"),
    (b'{"model": "sim-llama", "input": [{"role": "robot", "content": "x"}]}', 400, "input[0].role", "invalid_value"),
    (b'{"model": "sim-llama", "input": "x", "tools": [{"type": "web_search"}]}', 400, "tools[0].type",
     "unsupported_value"),
    (b'{"model": "sim-llama", "input": "x", "previous_response_id": "resp_1", "conversation": "conv_1"}', 400,
     "conversation", "invalid_value"),
    (b'{"model": "sim-llama", "input": "x", "previous_response_id": "resp_nope"}', 404, "previous_response_id",
     "not_found"),
    (b'{"model": "sim-llama", "input": "x", "conversation": "conv_0123456789abcdef0123456789abcdef"}', 404,
     "conversation", "not_found"),
    (b'{"model": "sim-llama", "input": "x", "max_output_tokens": 0}', 400, "max_output_tokens", "invalid_value"),
    (b'{"model": "sim-llama", "input": "x", "background": true}', 400, "background", "unsupported_parameter"),
    (b'{"model": "sim-llama", "input": "' + b"y" * 5000 + b'"}', 400, "input[0]", "item_too_large"),
    (b'{"model": "sim-llama", "input": "' + b"y" * 70000 + b'"}', 413, None, "request_too_large"),
    (b'{"model": "no-such-model", "input": "x"}', 404, "model", "model_not_found"),
])
def test_malformed_and_oversized_requests(stack: Stack, body: bytes, status: int, param: str | None,
                                          code: str) -> None:
    got, payload = _post(stack.base + "/v1/responses", body)
    assert got == status, payload
    err = payload["error"]
    assert isinstance(err, dict) and err["code"] == code and err["param"] == param and err["message"]


def test_conversation_limits_and_bad_ids(stack: Stack) -> None:
    c = stack.client()
    with pytest.raises(openai.BadRequestError, match="at most 16"):
        c.conversations.create(metadata={str(i): "v" for i in range(17)})
    with pytest.raises(openai.BadRequestError, match="at most 20 items"):
        c.conversations.create(items=[{"type": "message", "role": "user", "content": "x"}] * 21)
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "x"}] * 11)
    with pytest.raises(openai.BadRequestError) as full:
        c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}] * 3)
    assert full.value.code == "conversation_item_limit"
    with pytest.raises(openai.BadRequestError) as full:
        # 11 + input fits, so the backend runs; 11 + input + output does not, so nothing is appended.
        c.responses.create(model=MODEL, input="x", conversation=conv.id, max_output_tokens=4)
    assert full.value.code == "conversation_item_limit"
    assert len(c.conversations.items.list(conv.id, limit=100).data) == 11
    c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as full:
        c.responses.create(model=MODEL, input="x", conversation=conv.id)  # refused before the backend
    assert full.value.code == "conversation_item_limit"
    for bad in ("conv_x", "../../etc", "conv_" + "0" * 32):
        with pytest.raises(openai.NotFoundError):
            c.conversations.retrieve(bad)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_{tenant}")


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _backend_saw(stack: Stack, call_id: str) -> dict[str, Any]:
    """The record of the backend request whose history holds this call and its result."""
    for rec in stack.records():
        roles = rec.get("messages") or []
        calls = [c["id"] for m in roles for c in m.get("tool_calls", [])]
        results = [m.get("tool_call_id") for m in roles if m["role"] == "tool"]
        if call_id in calls and call_id in results:
            return rec
    raise AssertionError(f"no backend request carried call {call_id} and its result")


def test_function_call_then_its_output_continues_the_chain(stack: Stack) -> None:
    c = stack.client()
    r1 = c.responses.create(model=MODEL, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                            input="What is the weather in Paris?")
    assert r1.status == "completed"
    (call,) = r1.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("chatcmpl-tool-") and json.loads(call.arguments) == {"city": "sim-city"}
    assert c.responses.retrieve(r1.id).output[0].call_id == call.call_id  # type: ignore[union-attr]

    r2 = c.responses.create(model=MODEL, tools=[WEATHER], previous_response_id=r1.id, max_output_tokens=8,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r2.output_text and r2.output[0].type == "message"  # a tool result is answered with text
    rec = _backend_saw(stack, call.call_id)
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "tool"]
    assert rec["tool_call"] is None


def test_streamed_function_call_events_and_continuation(stack: Stack) -> None:
    c = stack.client()
    events = list(c.responses.create(model=MODEL, tools=[WEATHER], tool_choice="required", stream=True,
                                     input="Use get_weather for Paris."))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"} and len(kinds) > 6
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2].item  # type: ignore[union-attr]
    assert added.type == "function_call" and added.name == "get_weather" and added.status == "in_progress"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    assert events[-3].arguments == deltas and json.loads(deltas) == {"city": "sim-city"}  # type: ignore[union-attr]
    done = events[-2].item  # type: ignore[union-attr]
    assert done.id == added.id and done.status == "completed" and done.arguments == deltas
    final = events[-1].response  # type: ignore[union-attr]
    assert [o.type for o in final.output] == ["function_call"] and final.output[0].call_id == added.call_id
    assert final.usage is not None and final.usage.output_tokens > 0

    follow = list(c.responses.create(model=MODEL, tools=[WEATHER], previous_response_id=final.id, stream=True,
                                     max_output_tokens=8, input=[{"type": "function_call_output",
                                                                  "call_id": added.call_id, "output": "rain"}]))
    assert follow[-1].type in ("response.completed", "response.incomplete")
    assert follow[-1].response.output_text  # type: ignore[union-attr]
    assert [m["role"] for m in _backend_saw(stack, added.call_id)["messages"]] == ["user", "assistant", "tool"]


def test_a_busy_conversation_answers_409_over_http(stack: Stack) -> None:
    c = stack.client()
    conv = c.conversations.create()
    for sim in stack.sims:  # hold the first response open at the backend
        _call("POST", sim + "/admin/faults", b'{"latency_ms": 1500}')
    outcomes: list[Any] = []

    def run() -> None:
        try:
            outcomes.append(c.responses.create(model=MODEL, input="Hold on.", conversation=conv.id,
                                               max_output_tokens=4))
        except openai.APIStatusError as exc:
            outcomes.append(exc)

    try:
        first = threading.Thread(target=run)
        first.start()
        time.sleep(0.4)  # the first has taken the lock and is waiting for its first token
        run()
        first.join(10)
    finally:
        for sim in stack.sims:
            _call("DELETE", sim + "/admin/faults")
    (refused,) = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    (served,) = [o for o in outcomes if not isinstance(o, openai.APIStatusError)]
    assert refused.status_code == 409 and refused.code == "conversation_locked"
    assert refused.response.headers["retry-after"] == "1"
    assert served.status in ("completed", "incomplete")
    assert len(c.conversations.items.list(conv.id).data) == 2  # only the served one appended
