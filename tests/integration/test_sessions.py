"""Session affinity over HTTP: `x-session-id` or the body's `user` sticks to a backend until it restarts."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
_words = itertools.count()


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    async def go() -> tuple[int, dict[str, str], str]:
        async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers or {}) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()
    return asyncio.run(go())


class Stack:
    def __init__(self, sims: list[Proc], gateways: dict[bool, Proc]) -> None:
        self.sims = [f"http://127.0.0.1:{s.port}" for s in sims]
        self.gateways = {flag: f"http://127.0.0.1:{g.port}" for flag, g in gateways.items()}

    def chat(self, from_user: bool, user: str | None = None, session: str | None = None) -> tuple[str, str]:
        """(backend, x-gravity-route) of one chat completion; every prompt differs, so no prefix affinity."""
        body: dict[str, object] = {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": f"{next(_words)} distinct question number {next(_words)}"}]}
        if user is not None:
            body["user"] = user
        headers = {"x-session-id": session} if session else {}
        status, got, text = _post(self.gateways[from_user] + "/v1/chat/completions", body, headers)
        assert status == 200, text
        return got["x-gravity-backend"], got["x-gravity-route"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("sessions")
    redis = start_redis(tmp)
    sims = [start_sim(tmp, MODEL, ["--profile", "tiny", "--time-scale", "20"]) for _ in range(2)]
    base = {"server": {"debug_headers": True},
            "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
            "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                         for i, s in enumerate(sims)]}
    gateways: dict[bool, Proc] = {}
    try:
        for flag in (True, False):
            gateways[flag] = start_gateway(tmp, {**base, "routing": {"session_from_user": flag}})
        yield Stack(sims, gateways)
    finally:
        for p in (*gateways.values(), *sims, redis):
            p.stop()


def _session_score(route: str, backend: str) -> str:
    """The session scorer's value for `backend` in the x-gravity-route header."""
    part = next(p for p in route.split() if p.startswith(backend + ";"))
    return next(kv.split("=")[1] for kv in part.split(";")[-1].split(",") if kv.startswith("session="))


def test_body_user_sticks_with_session_from_user(stack: Stack) -> None:
    first, _ = stack.chat(True, user="alice")
    for _ in range(5):
        backend, route = stack.chat(True, user="alice")
        assert backend == first and _session_score(route, backend) == "1.00"


def test_session_header_sticks_without_the_flag_and_user_does_not(stack: Stack) -> None:
    first, _ = stack.chat(False, session="s-1")
    for _ in range(5):
        backend, route = stack.chat(False, session="s-1")
        assert backend == first and _session_score(route, backend) == "1.00"
    stack.chat(False, user="bob")
    _, route = stack.chat(False, user="bob")
    assert all(_session_score(route, f"sim-{i}") == "0.00" for i in range(2))  # the flag is off: no session


def test_a_backend_restart_drops_the_affinity(stack: Stack) -> None:
    served, _ = stack.chat(True, user="carol")
    assert _session_score(stack.chat(True, user="carol")[1], served) == "1.00"
    assert _post(stack.sims[int(served.removeprefix("sim-"))] + "/admin/reset", {})[0] == 200
    time.sleep(0.6)  # a few scrapes: the gateways see the new process_start_time
    backend, route = stack.chat(True, user="carol")
    # Routed by score alone: no endpoint carries the session's bonus.
    assert all(_session_score(route, f"sim-{i}") == "0.00" for i in range(2))
    # ... and the affinity is rebuilt on whichever backend served it.
    again, route = stack.chat(True, user="carol")
    assert again == backend and _session_score(route, backend) == "1.00"
