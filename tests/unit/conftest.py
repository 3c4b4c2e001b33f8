"""Unit tests run no processes: the shared fixtures that start a redis-server are refused here."""
from __future__ import annotations

import pytest


@pytest.fixture
def redis_server() -> None:
    pytest.fail("a unit test may not start a redis-server: put it in tests/integration")
