from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.openai_requests import chat_prompt_bytes
from gateway.state.translate import (
    chat_output_items,
    check_metadata,
    items_to_messages,
    normalise_items,
    responses_usage,
    text_format_to_chat,
    tool_choice_to_chat,
    tools_to_chat,
)


def test_string_input_is_one_user_message_with_a_fresh_id() -> None:
    [item] = normalise_items("hi", 1000)
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "hi"}]
    assert normalise_items("hi", 1000)[0]["id"] != item["id"]


def test_history_renders_to_the_same_prefix_bytes_every_time() -> None:
    turn1 = normalise_items("What is data gravity?", 10_000)
    out1 = chat_output_items({"content": "Mass attracts apps."})
    turn2 = normalise_items([{"role": "user", "content": [{"type": "input_text", "text": "More?"}]}], 10_000)
    first = chat_prompt_bytes(items_to_messages(turn1, "Be brief."))
    again = chat_prompt_bytes(items_to_messages([*turn1, *out1, *turn2], "Be brief."))
    assert again.startswith(first)
    assert again == chat_prompt_bytes(items_to_messages([*turn1, *out1, *turn2], "Be brief."))


def test_function_calls_join_their_assistant_turn_and_outputs_become_tool_messages() -> None:
    items = normalise_items([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "summary": []},
    ], 10_000)
    msgs = items_to_messages(items)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    assert msgs[1]["content"] == "Checking." and [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


def test_developer_is_system_and_images_are_image_url_parts() -> None:
    items = normalise_items([{"role": "developer", "content": "rules"},
                             {"role": "user", "content": [{"type": "input_text", "text": "see"},
                                                          {"type": "input_image", "image_url": "data:x"}]}], 10_000)
    msgs = items_to_messages(items)
    assert msgs[0] == {"role": "system", "content": "rules"}
    assert msgs[1]["content"][1] == {"type": "image_url", "image_url": {"url": "data:x", "detail": "auto"}}


def test_chat_output_with_tool_calls() -> None:
    items = chat_output_items({"content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}}]})
    assert [(i["type"], i["call_id"], i["arguments"]) for i in items] == [("function_call", "call_9", '{"a":1}')]


@pytest.mark.parametrize(("value", "param"), [
    (42, "input"),
    ([{"role": "robot", "content": "x"}], "input[0].role"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0]"),
    ([{"type": "function_call", "name": "x"}], "input[0].call_id"),
    ("x" * 200, "input[0]"),
])
def test_bad_items_name_their_parameter(value: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        normalise_items(value, 100)
    assert err.value.param == param


def test_tools_tool_choice_and_text_format() -> None:
    assert tools_to_chat([{"type": "function", "name": "f", "parameters": {}}]) == [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(InvalidRequest):
        tools_to_chat([{"type": "file_search"}])
    assert tool_choice_to_chat({"type": "function", "name": "f"}) == {"type": "function", "function": {"name": "f"}}
    assert text_format_to_chat({"format": {"type": "json_schema", "name": "n", "schema": {}}}) == {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {}}}
    assert text_format_to_chat({"format": {"type": "text"}}) is None


def test_metadata_limits_and_usage() -> None:
    with pytest.raises(InvalidRequest):
        check_metadata({"k": "v" * 513})
    with pytest.raises(InvalidRequest):
        check_metadata({str(i): "" for i in range(17)})
    assert responses_usage({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
                           ) == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 2,
                                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}
