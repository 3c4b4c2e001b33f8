from __future__ import annotations

import routing


def test_public_api_is_exactly_all() -> None:
    exported = {n for n in dir(routing) if not n.startswith("_")}
    assert set(routing.__all__) <= exported
    for name in routing.__all__:
        assert getattr(routing, name) is not None
    assert "Scheduler" in routing.__all__ and "build_scheduler" in routing.__all__


def test_routing_imports_no_http_or_gateway_code() -> None:
    import pathlib

    root = pathlib.Path(routing.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import starlette", "import httpx", "import aiohttp", "from gateway", "import gateway",
                       "from policies", "from starlette", "from httpx", "from aiohttp"):
            assert banned not in text, f"{path} uses {banned}"
