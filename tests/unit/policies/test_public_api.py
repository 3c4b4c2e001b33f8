from __future__ import annotations

import pathlib

import policies


def test_public_api_is_exactly_all() -> None:
    exported = {n for n in dir(policies) if not n.startswith("_") and not isinstance(getattr(policies, n),
                                                                                   type(policies))}
    assert exported - {"annotations"} == set(policies.__all__)


def test_policies_import_no_gateway_or_http_code() -> None:
    root = pathlib.Path(policies.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("from gateway", "import gateway", "import starlette", "from starlette",
                       "import aiohttp", "from aiohttp", "from routing", "import routing"):
            assert banned not in text, f"{path} uses {banned}"
