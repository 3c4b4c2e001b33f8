"""The Responses streaming event sequence, translated from a chat completions stream as it arrives."""
from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import orjson

from gateway.errors import GatewayError, to_gateway_error
from gateway.proxy import Send
from gateway.sse import EventSplitter, event_json
from gateway.state.store import StateStore
from gateway.state.translate import call_item, message_item, responses_usage
from gateway.state.turn import Turn, commit

log = logging.getLogger("gravity.state")

__all__ = ["ResponseEvents"]

Item = dict[str, Any]


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class ResponseEvents:
    """Translate a chat completions stream into the Responses event sequence as chunks arrive."""

    def __init__(self, turn: Turn, send: Send) -> None:
        self.turn = turn
        self._send = send
        self.started = False
        self._passthrough = False
        self._json = False
        self._seq = 0
        self._splitter = EventSplitter()
        self._output: list[Item] = []
        self._text: Item | None = None
        self._text_index = -1
        self._calls: dict[int, tuple[int, Item]] = {}
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None
        self._error: dict[str, Any] | None = None
        self._raw: list[bytes] = []

    async def _emit(self, *events: dict[str, Any]) -> None:
        out = []
        for event in events:
            out.append(_sse({**event, "sequence_number": self._seq}))
            self._seq += 1
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": True})

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                # An error before any event: the proxy's OpenAI-shaped error answers as it is.
                self._passthrough = True
                await self._send(message)
                return
            self.started = True
            headers = {k.lower(): v for k, v in message["headers"]}
            self._json = not headers.get(b"content-type", b"").startswith(b"text/event-stream")
            keep = [(k, v) for k, v in message["headers"] if k.lower() not in (b"content-type", b"content-length")]
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                *keep, (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
            created = self.turn.response("in_progress", [], None)
            await self._emit({"type": "response.created", "response": created},
                             {"type": "response.in_progress", "response": created})
            return
        if self._passthrough:
            await self._send(message)
            return
        body = message.get("body", b"")
        if self._json:
            self._raw.append(body)
            return
        for event in self._splitter.feed(body):
            await self._on_event(event)
        if not message.get("more_body") and (rest := self._splitter.rest()):
            await self._on_event(rest + b"\n\n")

    async def _on_event(self, event: bytes) -> None:
        payload = event_json(event)
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("error"), dict):
            self._error = payload["error"]
            return
        if isinstance(payload.get("usage"), dict):
            self._usage = payload["usage"]
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                await self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                await self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    async def _text_delta(self, text: str) -> None:
        if self._text is None:
            self._text = message_item("", status="in_progress")
            self._text["content"] = []
            self._text_index = len(self._output)
            self._output.append(self._text)
            await self._emit({"type": "response.output_item.added", "output_index": self._text_index,
                              "item": self._text},
                             {"type": "response.content_part.added", "item_id": self._text["id"],
                              "output_index": self._text_index, "content_index": 0,
                              "part": {"type": "output_text", "text": "", "annotations": []}})
            self._text["content"] = [{"type": "output_text", "text": "", "annotations": []}]
        self._text["content"][0]["text"] += text
        await self._emit({"type": "response.output_text.delta", "item_id": self._text["id"],
                          "output_index": self._text_index, "content_index": 0, "delta": text, "logprobs": []})

    async def _close_text(self) -> None:
        item, index = self._text, self._text_index
        if item is None or item["status"] == "completed":
            return
        item["status"] = "completed"
        part = item["content"][0]
        await self._emit({"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                          "content_index": 0, "text": part["text"], "logprobs": []},
                         {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                          "content_index": 0, "part": part},
                         {"type": "response.output_item.done", "output_index": index, "item": item})

    async def _call_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        fn = call.get("function") or {}
        if index not in self._calls:
            await self._close_text()  # a message item ends before the calls that follow it
            item = call_item(str(call.get("id") or ""), str(fn.get("name") or ""), "", status="in_progress")
            self._calls[index] = (len(self._output), item)
            self._output.append(item)
            await self._emit({"type": "response.output_item.added", "output_index": len(self._output) - 1,
                              "item": item})
        position, item = self._calls[index]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            await self._emit({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                              "output_index": position, "delta": fn["arguments"]})

    async def _close_calls(self) -> None:
        for position, item in self._calls.values():
            item["status"] = "completed"
            await self._emit({"type": "response.function_call_arguments.done", "item_id": item["id"],
                              "output_index": position, "arguments": item["arguments"]},
                             {"type": "response.output_item.done", "output_index": position, "item": item})

    async def _fail(self, error: dict[str, Any]) -> None:
        failed = self.turn.response("failed", self._output, responses_usage(self._usage))
        failed["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        await self._emit({"type": "error", "code": error.get("code"), "message": error.get("message", ""),
                          "param": error.get("param")},
                         {"type": "response.failed", "response": failed})

    async def finish(self, store: StateStore) -> None:
        if self._passthrough:
            return
        if self._json:
            await self._from_whole(b"".join(self._raw))
        if self._error is not None:
            await self._fail(self._error)
        else:
            await self._close_text()
            await self._close_calls()
            incomplete = "max_output_tokens" if self._finish == "length" else None
            response = self.turn.response("incomplete" if incomplete else "completed", self._output,
                                          responses_usage(self._usage), incomplete)
            try:
                # Stored before the client hears "completed", so it can continue at once.
                await commit(store, self.turn, response)
            except GatewayError as exc:
                await self._fail(exc.body()["error"])
            else:
                kind = "response.incomplete" if incomplete else "response.completed"
                await self._emit({"type": kind, "response": response})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _from_whole(self, body: bytes) -> None:
        """A backend that answered a stream request with one JSON body: replay it as events."""
        try:
            chat = orjson.loads(body)
            choice = chat["choices"][0]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            self._error = to_gateway_error(GatewayError("The backend returned a malformed chat completion.",
                                                        status=502, code="bad_gateway")).body()["error"]
            return
        message = choice.get("message") or {}
        if message.get("content"):
            await self._text_delta(message["content"])
        for i, call in enumerate(message.get("tool_calls") or []):
            await self._call_delta({**call, "index": i})
        self._finish = choice.get("finish_reason")
        self._usage = chat.get("usage")
