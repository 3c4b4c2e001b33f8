"""The Responses event sequence from a chat stream, and from a backend that answered a stream with JSON."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, cast

import orjson
import pytest

from gateway.config import StateConfig
from gateway.state.events import ResponseEvents
from gateway.state.keys import new_hex, response_id
from gateway.state.request import parse_responses_request
from gateway.state.store import StateStore
from gateway.state.turn import Turn

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]


class _Store:
    """Records what would be committed; the Lua scripts have their own tests on a real Redis."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    async def save_response(self, tenant: str, rid: str, thread: str, **kw: Any) -> None:
        self.saved.append({"id": rid, **kw})


def _turn() -> Turn:
    req = parse_responses_request(orjson.dumps({"model": "m", "input": "hi", "stream": True, "tools": TOOLS}),
                                  StateConfig())
    own = new_hex()
    return Turn(req, "default", response_id(own, own), own, 0, new_hex())


async def _run(start_headers: list[tuple[bytes, bytes]], bodies: list[bytes]) -> tuple[list[dict[str, Any]], _Store]:
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    events, store = ResponseEvents(_turn(), send), _Store()
    await events.send({"type": "http.response.start", "status": 200, "headers": start_headers})
    for i, body in enumerate(bodies):
        await events.send({"type": "http.response.body", "body": body, "more_body": i < len(bodies) - 1})
    await events.finish(cast(StateStore, store))
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    out = [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: ")]
    return out, store


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CALL = {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"x"}'}}
USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


async def test_json_answer_to_a_stream_request_is_replayed_as_events() -> None:
    chat = {"choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}}],
            "usage": USAGE}
    events, store = await _run([(b"content-type", b"application/json")], [orjson.dumps(chat)])
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "chatcmpl-tool-1" and final["output"][1]["arguments"] == '{"city":"x"}'
    assert final["usage"]["output_tokens"] == 4
    assert store.saved and store.saved[0]["output_items"] == final["output"]


@pytest.mark.parametrize("split", [1, 7, 1000])
async def test_streamed_call_deltas_in_any_chunking(split: int) -> None:
    stream = b"".join([
        _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}),
        _sse({"choices": [{"index": 0, "delta": {"tool_calls": [{**CALL, "index": 0,
                                                                  "function": {"name": "get_weather",
                                                                               "arguments": ""}}]}}]}),
        _sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}}]}),
        _sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"x"}'}}]},
                           "finish_reason": "tool_calls"}]}),
        _sse({"choices": [], "usage": USAGE}), b"data: [DONE]\n\n"])
    chunks = [stream[i:i + split] for i in range(0, len(stream), split)]
    events, _ = await _run([(b"content-type", b"text/event-stream")], chunks)
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["arguments"] == ""
    assert events[5]["arguments"] == '{"city":"x"}' and events[6]["item"]["status"] == "completed"
