"""The compose stack for tests/compose: up once per session on free host ports, down -v at the end.

Run by `make compose-test` (which builds the images first), never by `make test`: tests/conftest.py
leaves this folder out unless GRAVITY_COMPOSE_TESTS=1.
"""
from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from openai import OpenAI

from tests.compose import harness
from tests.support.procs import free_port


@dataclass
class Stack:
    env: dict[str, str]
    ports: dict[str, int]
    ready_after: dict[str, float] = field(default_factory=dict)

    def url(self, service: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def client(self, service: str = "gateway", **kw: object) -> OpenAI:
        return OpenAI(base_url=self.url(service) + "/v1", api_key="unused", max_retries=0,
                      timeout=30, **kw)  # type: ignore[arg-type]

    def container(self, service: str) -> str:
        return harness.container(service)

    def up(self) -> None:
        self.ready_after = harness.up(self.env)

    def down(self) -> None:
        harness.down(self.env)

    def restart(self, service: str) -> float:
        """`podman restart` (SIGTERM, then start) and wait until healthy again; the seconds it took."""
        started = time.monotonic()
        harness.podman("restart", "--time", "45", self.container(service), timeout=120)
        harness.wait_healthy(service)
        return time.monotonic() - started

    def get_json(self, service: str, path: str) -> object:
        with urllib.request.urlopen(self.url(service) + path, timeout=10) as resp:
            return json.loads(resp.read())

    def get_text(self, service: str, path: str) -> str:
        with urllib.request.urlopen(self.url(service) + path, timeout=10) as resp:
            return str(resp.read().decode())

    def wait_ready(self, service: str = "gateway", timeout: float = 60) -> None:
        """Until the gateway's /ready answers 200 (every model has a healthy backend again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url(service) + "/ready", timeout=2):
                    return
            except OSError:  # URLError and HTTPError (503 while not ready) included
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{service} not ready within {timeout} s")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    reason = harness.container_check()
    if reason:
        pytest.fail(f"containers cannot run here: {reason}")
    for image in (harness.GRAVITY_IMAGE, harness.PROMETHEUS_IMAGE):
        if not harness.image_exists(image):
            pytest.fail(f"{image} is missing: run `make compose-test` (it builds the images first)")
    ports = {"gateway": free_port(), "gateway-b": free_port(), "prometheus": free_port()}
    env = harness.podman_env({"GRAVITY_PORT": str(ports["gateway"]), "GRAVITY_B_PORT": str(ports["gateway-b"]),
                              "PROMETHEUS_PORT": str(ports["prometheus"])})
    s = Stack(env, ports)
    harness.down(env)  # whatever an interrupted run left behind
    try:
        s.up()
        yield s
    finally:
        s.down()
