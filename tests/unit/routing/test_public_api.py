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

    from tests.unit.test_layering import EVAL_MAY_IMPORT

    root = pathlib.Path(routing.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.is_relative_to(root / "eval"):
            # The evaluator drives the gateway's pure attempt policies (tests/unit/test_layering.py says why).
            text = "\n".join(line for line in text.splitlines()
                              if not any(line.strip().startswith(f"from {m} import") for m in EVAL_MAY_IMPORT))
        for banned in ("import starlette", "import httpx", "import aiohttp", "from gateway", "import gateway",
                       "from policies", "from starlette", "from httpx", "from aiohttp"):
            assert banned not in text, f"{path} uses {banned}"
