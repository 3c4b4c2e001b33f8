"""Tool calls as vLLM answers them with --enable-auto-tool-choice: planning, and the HTTP wire shapes."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from simulator import tokenizer
from simulator.server import SimServerConfig
from simulator.tools import ToolError, example_arguments, message_shapes, plan_tool_call
from tests.unit.simulator.test_server import CHAT, serve, sse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "required": ["city", "days"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                   "unit": {"type": "string", "enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize(("schema", "expected"), [
    ({"type": "string"}, "sim-value"),
    ({"type": "string", "enum": ["a", "b"]}, "a"),
    ({"type": "integer", "minimum": 3}, 3),
    ({"type": "number"}, 1.5),
    ({"type": "boolean"}, True),
    ({"type": ["null", "integer"]}, 1),
    ({"type": "array", "items": {"type": "boolean"}}, [True]),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 1),
    ({"type": "string", "default": "x"}, "x"),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["b"]},
     {"b": 1}),
    ({"properties": {"q": {"type": "object", "properties": {"n": {"const": 4}}}}}, {"q": {"n": 4}}),
])
def test_example_arguments_fit_the_schema(schema: dict[str, Any], expected: Any) -> None:
    assert example_arguments(schema) == expected


@pytest.mark.parametrize(("choice", "messages", "name", "finish", "content"), [
    ("required", [{"role": "user", "content": "hi"}], "get_time", "tool_calls", ""),
    ("required", [{"role": "user", "content": "use get_weather"}], "get_weather", "tool_calls", ""),
    ({"type": "function", "function": {"name": "get_weather"}}, [{"role": "user", "content": "hi"}],
     "get_weather", "stop", ""),
    ("auto", [{"role": "user", "content": "call get_weather now"}], "get_weather", "tool_calls", None),
    (None, [{"role": "user", "content": "call get_time"}], "get_time", "tool_calls", None),
])
def test_plan_picks_the_call_as_vllm_would(choice: Any, messages: list[dict[str, Any]], name: str, finish: str,
                                            content: str | None) -> None:
    body: dict[str, Any] = {"messages": messages, "tools": [TIME, WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    plan = plan_tool_call(body)
    assert plan is not None and plan.name == name and plan.finish_reason == finish and plan.content == content
    assert plan.id.startswith("chatcmpl-tool-") and plan.token_ids
    assert plan.arguments_upto(len(plan.token_ids)) == plan.arguments
    again = plan_tool_call(body)
    assert again is not None and again.arguments == plan.arguments  # deterministic, ids aside


@pytest.mark.parametrize("body", [
    {"messages": ASK},
    {"messages": ASK, "tools": [WEATHER], "tool_choice": "none"},
    {"messages": ASK, "tools": [WEATHER], "tool_choice": "auto"},  # does not name the function
    # A tool result answers the call: auto does not call again on it.
    {"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "get_weather: sunny"}],
     "tools": [WEATHER]},
])
def test_no_call_without_a_reason(body: dict[str, Any]) -> None:
    assert plan_tool_call(body) is None


@pytest.mark.parametrize(("body", "match"), [
    ({"messages": ASK, "tool_choice": "required"}, "`tools` must be set"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "has not been passed"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"messages": ASK, "tools": [{"type": "function"}]}, r"tools\[0\]"),
])
def test_bad_tools_are_refused(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ToolError, match=match):
        plan_tool_call(body)


def test_message_shapes_keep_roles_and_call_ids_only() -> None:
    shapes = message_shapes([
        {"role": "user", "content": "secret"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "secret too"}])
    assert shapes == [{"role": "user"}, {"role": "assistant", "tool_calls": [{"id": "c1", "name": "f"}]},
                      {"role": "tool", "tool_call_id": "c1"}]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with serve(SimServerConfig(model="m")) as session:
        yield session


async def test_forced_call_non_streamed(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "m", "messages": ASK, "tools": [WEATHER],
                                       "tool_choice": "required"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "sim-city", "days": 1}
    assert body["usage"]["completion_tokens"] == len(plan_tool_call({"messages": ASK, "tools": [WEATHER],
                                                                     "tool_choice": "required"}).token_ids)  # type: ignore[union-attr]
    async with client.get("/admin/requests") as resp:
        rec = (await resp.json())["requests"][-1]
    assert rec["tool_call"] == {"id": call["id"], "name": "get_weather"} and rec["messages"] == [{"role": "user"}]


async def test_named_call_streams_in_openai_delta_shape(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "m", "messages": ASK, "tools": [TIME, WEATHER], "stream": True,
                                       "stream_options": {"include_usage": True},
                                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
                           ) as resp:
        events = await sse(resp)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    chunks = [e["choices"][0] for e in events[:-2]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
    first = chunks[1]["delta"]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("chatcmpl-tool-") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    rest = [c["delta"]["tool_calls"][0] for c in chunks[2:]]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    arguments = "".join(d["function"]["arguments"] for d in rest)
    assert json.loads(arguments) == {"city": "sim-city", "days": 1}
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]  # named: vLLM says stop
    assert events[-2]["usage"]["completion_tokens"] == len(tokenizer.encode(arguments))


async def test_max_tokens_cuts_the_arguments_short(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "m", "messages": ASK, "tools": [WEATHER], "max_tokens": 2,
                                       "tool_choice": "required"}) as resp:
        body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    assert not choice["message"]["tool_calls"][0]["function"]["arguments"].endswith("}")


async def test_tool_history_reaches_the_prompt_and_the_record(client: aiohttp.ClientSession) -> None:
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "sunny"}]
    prompts = []
    for messages in (ASK, history):
        # ignore_eos: without it the request may stop early at its seeded natural length
        async with client.post(CHAT, json={"model": "m", "messages": messages, "tools": [WEATHER],
                                           "max_tokens": 3, "ignore_eos": True}) as resp:
            body = await resp.json()
        assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "length"
        prompts.append(body["usage"]["prompt_tokens"])
    assert prompts[1] > prompts[0] + 10  # the call's JSON and the result are rendered into the prompt
    async with client.get("/admin/requests") as resp:
        rec = (await resp.json())["requests"][-1]
    assert rec["messages"] == [{"role": "user"},
                               {"role": "assistant", "tool_calls": [{"id": "chatcmpl-tool-1", "name": "get_weather"}]},
                               {"role": "tool", "tool_call_id": "chatcmpl-tool-1"}]
    assert rec["tool_call"] is None


async def test_bad_tool_choice_is_a_vllm_400(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "m", "messages": ASK, "tool_choice": "required"}) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["param"] == "tool_choice" and "`tools` must be set" in err["message"]
