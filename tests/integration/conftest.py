"""The gateway's two HTTP stacks: modules marked `both_stacks` run every test on each.

`fast` is the gateway's own server and upstream client (the default: `server: {engine: fast,
upstream_client: auto}`, docs/decisions/0005, 0006); `uvicorn` is uvicorn + aiohttp. A gateway
started by `tests.support.procs.start_gateway` inside such a module gets the stack of its run (a
module-scoped fixture that starts one must ask for `gateway_stack`, or pytest reuses it across both);
so does every test when GRAVITY_TEST_STACK=uvicorn is set for a whole run.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

STACKS = ("uvicorn", "fast")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_stacks") is not None:
        metafunc.parametrize("gateway_stack", STACKS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def gateway_stack(request: pytest.FixtureRequest) -> Iterator[str]:
    stack = getattr(request, "param", None)
    if stack is None:
        yield os.environ.get("GRAVITY_TEST_STACK", "fast")
        return
    old = os.environ.get("GRAVITY_TEST_STACK")
    os.environ["GRAVITY_TEST_STACK"] = stack
    try:
        yield stack
    finally:
        if old is None:
            os.environ.pop("GRAVITY_TEST_STACK", None)
        else:
            os.environ["GRAVITY_TEST_STACK"] = old
