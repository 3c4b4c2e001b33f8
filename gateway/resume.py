"""Mid-stream resume: what a broken stream already told the client, and how another endpoint continues it.

The relay keeps the raw events of the current attempt and parses nothing on the way (streaming
stays cheap); only when a stream breaks are they read back, to rebuild the partial answer. The
continuation asks vLLM to extend the partial assistant message (`continue_final_message: true,
add_generation_prompt: false`; completions: prompt plus the partial text) for the tokens still
owed, and its chunks are rewritten to carry the first response's `id`, `created`, `model` and
`system_fingerprint`. The final usage adds up over attempts. docs/resilience.md, "Mid-stream resume".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.sse import event_json, split_events

__all__ = ["ResumeState", "resumable"]

_IDENTITY = ("id", "created", "model", "system_fingerprint")


def resumable(route: str, body: dict[str, Any]) -> bool:
    """Whether a stream of this request could be continued elsewhere at all."""
    n = body.get("n")
    if n not in (None, 1):
        return False
    if route == "chat/completions":
        return True
    return route == "completions" and isinstance(body.get("prompt"), str)


@dataclass
class ResumeState:
    """One client stream across its attempts."""

    route: str
    body: dict[str, Any]
    """The client's request as first sent upstream (usage asked for)."""
    events: list[bytes] = field(default_factory=list)
    """Raw events of the current attempt, kept until it ends (a piece may hold several whole events)."""
    identity: dict[str, Any] | None = None
    """`id`, `created`, `model`, `system_fingerprint` of the first chunk the client saw."""
    text: str = ""
    """Content the client received, over all attempts so far."""
    tokens: int = 0
    """Completion tokens the client received (from continuous usage when present, else one per chunk)."""
    prompt_tokens: int | None = None
    """Prompt tokens of the first attempt, when it reported them (else derived from a later one)."""
    resumes: int = 0
    unsafe: bool = False
    """A tool call was in flight: no safe point to resume from."""
    _attempt_tokens: int = 0

    # -- reading back a broken attempt -------------------------------------------------------------
    def absorb(self) -> None:
        """Fold the current attempt's events into what the client has received."""
        counted = 0
        usage_tokens: int | None = None
        for raw in (event for blob in self.events for event in split_events(blob)):
            payload = event_json(raw)
            if not isinstance(payload, dict):
                continue
            if self.identity is None and payload.get("choices") is not None:
                self.identity = {k: payload[k] for k in _IDENTITY if k in payload}
            usage = payload.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
                if self.resumes == 0 and isinstance(usage.get("prompt_tokens"), int):
                    self.prompt_tokens = usage["prompt_tokens"]
            for choice in payload.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                piece = _piece(self.route, choice)
                if piece:
                    self.text += piece
                    counted += 1
                delta = choice.get("delta")
                if isinstance(delta, dict) and delta.get("tool_calls"):
                    self.unsafe = True
        self.tokens += usage_tokens if usage_tokens is not None else counted
        self.events.clear()

    def continuation(self) -> bytes | None:
        """The body that continues the stream on another endpoint, or None when nothing is owed."""
        body = dict(self.body)
        for name in ("max_completion_tokens", "max_tokens"):
            limit = body.get(name)
            if isinstance(limit, int) and not isinstance(limit, bool):
                left = limit - self.tokens
                if left <= 0:
                    return None
                body[name] = left
        if self.text:
            if self.route == "chat/completions":
                body["messages"] = [*body["messages"], {"role": "assistant", "content": self.text}]
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            else:
                body["prompt"] = str(body["prompt"]) + self.text
        return orjson.dumps(body)

    # -- the continuation's chunks --------------------------------------------------------------------
    def rewrite(self, raw: bytes) -> bytes | None:
        """A continuation's event as the client must see it (None: drop it)."""
        payload = event_json(raw)
        if not isinstance(payload, dict):
            return raw  # [DONE], comments: as they are
        if self.identity:
            payload.update(self.identity)
        choices = payload.get("choices")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            payload["usage"] = self.total_usage(usage)
        if isinstance(choices, list):
            kept = []
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and "role" in delta:
                    delta = {k: v for k, v in delta.items() if k != "role"}
                    choice = {**choice, "delta": delta}
                    if not any(delta.values()) and not choice.get("finish_reason"):
                        continue  # the role chunk: the client had it from the first attempt
                kept.append(choice)
            if choices and not kept and not isinstance(usage, dict):
                return None
            payload["choices"] = kept
            if any(isinstance(c, dict) and c.get("finish_reason") for c in kept):
                # How a client tells: the chunk that ends a resumed stream says how often it was resumed.
                payload["x_gravity"] = {"resumes": self.resumes}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def closing_usage(self, estimated_prompt_tokens: int) -> tuple[dict[str, Any], bytes]:
        """The usage and its chunk for a stream that broke with nothing left to produce (its backend
        went silent after the last token, before its usage chunk). The first attempt's prompt count
        when it reported one, else the gateway's own estimate."""
        prompt = self.prompt_tokens if self.prompt_tokens is not None else estimated_prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}
        obj = "chat.completion.chunk" if self.route == "chat/completions" else "text_completion"
        payload = {**(self.identity or {}), "object": obj, "choices": [], "usage": usage}
        return usage, b"data: " + orjson.dumps(payload) + b"\n\n"

    def total_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """Usage over all attempts: the first attempt's prompt, every attempt's completion tokens.

        A continuation's prompt holds the partial output again; its own prompt count minus the tokens
        already sent stands for the first attempt's when that attempt died before reporting."""
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        if not isinstance(completion, int) or not isinstance(prompt, int):
            return usage
        first_prompt = self.prompt_tokens if self.prompt_tokens is not None else max(0, prompt - self.tokens)
        total = {**usage, "prompt_tokens": first_prompt, "completion_tokens": self.tokens + completion,
                 "total_tokens": first_prompt + self.tokens + completion}
        return total


def _piece(route: str, choice: dict[str, Any]) -> str:
    if route == "chat/completions":
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""
