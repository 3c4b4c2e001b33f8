"""Fixtures shared by every test: free ports, a private redis-server, process cleanup."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import REPO, Proc, start_redis

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO / "config" / "tiktoken"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Proc]:
    """A redis-server of the test's own on a free loopback port (never the shared 6379)."""
    proc = start_redis(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_url(redis_server: Proc) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/0"


# tests/compose runs the docker-compose stack in real containers (minutes, root, podman):
# `make compose-test` sets this; `make test` and a plain `pytest` leave the folder out.
collect_ignore = [] if os.environ.get("GRAVITY_COMPOSE_TESTS") == "1" else ["compose"]
