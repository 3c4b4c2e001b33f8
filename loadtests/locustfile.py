"""Chat-completion load with shared prefixes, streamed and not, for `make run` (or any Gravity).

    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8080

Users are split among a few long system prompts, as the tenants of one application would be, and
keep short multi-turn conversations, so prefix-aware routing has something to find. Streamed
requests report three rows: `POST` (time to response headers, as locust measures a streamed
request), `TTFT` (time to the first content token) and `E2E` (time to `data: [DONE]`). Settings come from the environment:
GRAVITY_MODEL (sim-llama), GRAVITY_STREAM_SHARE (0.5), GRAVITY_MAX_TOKENS (64), GRAVITY_API_KEY.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task

MODEL = os.environ.get("GRAVITY_MODEL", "sim-llama")
STREAM_SHARE = float(os.environ.get("GRAVITY_STREAM_SHARE", "0.5"))
MAX_TOKENS = int(os.environ.get("GRAVITY_MAX_TOKENS", "64"))
API_KEY = os.environ.get("GRAVITY_API_KEY", "unused")
MAX_TURNS = 4

_RULES = [
    "Answer in plain English and keep replies under one hundred words unless asked for detail.",
    "Never invent facts; say when you are unsure and suggest where the user could check.",
    "Use numbered steps for procedures and short paragraphs for explanations.",
    "Quote exact error messages back to the user before explaining them.",
    "Prefer the standard library and well-known tools over obscure dependencies.",
    "When the user shares code, point to the line you mean by its number.",
]


def _system_prompt(role: str, domain: str, n_rules: int) -> str:
    # Long enough (several KV blocks) that a shared prefix is worth routing for.
    rules = "\n".join(f"{i + 1}. {_RULES[i % len(_RULES)]} ({domain} policy {i + 1})" for i in range(n_rules))
    return f"You are {role} for {domain}. Follow these rules in every reply:\n{rules}"


# (weight, system prompt): a popular assistant, two common ones and a rare one, as in real traffic.
SYSTEM_PROMPTS: list[tuple[int, str]] = [
    (5, _system_prompt("a support assistant", "Acme Cloud's hosting platform", 40)),
    (3, _system_prompt("a coding assistant", "a Python web framework", 30)),
    (2, _system_prompt("a travel agent", "a rail booking site", 24)),
    (1, _system_prompt("a legal-document summariser", "a small law firm", 60)),
]

QUESTIONS = [
    "How do I rotate my API keys without downtime?",
    "Why does my deployment fail with 'port already in use'?",
    "Summarise the main points of the last answer in three bullets.",
    "Can you give me an example configuration?",
    "What changed between the previous version and this one?",
    "Explain that again for someone new to the topic.",
    "What are the risks if I skip this step?",
    "Write a short checklist I can follow tomorrow.",
]


class ChatUser(HttpUser):
    """One end user: a fixed system prompt, a conversation of up to MAX_TURNS turns, then a new one."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        weights, prompts = zip(*SYSTEM_PROMPTS)
        self.prompt_index = random.choices(range(len(prompts)), weights=weights)[0]
        self.system = prompts[self.prompt_index]
        self.client.headers.update({"authorization": f"Bearer {API_KEY}"})
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}]

    def _body(self, stream: bool) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": random.choice(QUESTIONS)})
        body: dict[str, Any] = {"model": MODEL, "messages": self.messages, "max_tokens": MAX_TOKENS,
                                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _end_turn(self, reply: str) -> None:
        self.messages.append({"role": "assistant", "content": reply})
        if len(self.messages) >= 1 + 2 * MAX_TURNS:
            self._new_conversation()

    @task
    def chat(self) -> None:
        if random.random() < STREAM_SHARE:
            self._streamed()
        else:
            self._whole()

    def _whole(self) -> None:
        name = f"chat prompt={self.prompt_index}"
        with self.client.post("/v1/chat/completions", json=self._body(False), name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                self._new_conversation()
                return
            try:
                reply = resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"bad completion body: {exc!r}")
                self._new_conversation()
                return
            resp.success()
        self._end_turn(reply)

    def _report(self, kind: str, name: str, seconds: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=seconds * 1000,
                                             response_length=0, exception=None, context={})

    def _streamed(self) -> None:
        name = f"chat stream prompt={self.prompt_index}"
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        done = usage_seen = False
        with self.client.post("/v1/chat/completions", json=self._body(True), name=name, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                self._new_conversation()
                return
            for line in resp.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    resp.failure(f"error event: {event['error'].get('message')}")
                    self._new_conversation()
                    return
                if event.get("usage"):
                    usage_seen = True
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(text)
            if not done:
                resp.failure("stream ended without data: [DONE]")
            elif not usage_seen:
                resp.failure("stream_options.include_usage was asked for but no usage chunk came")
            else:
                resp.success()
        ended = time.perf_counter()
        if first is not None:
            self._report("TTFT", name, first - started)
        if done:
            self._report("E2E", name, ended - started)
        if done:
            self._end_turn("".join(parts))
        else:
            self._new_conversation()
