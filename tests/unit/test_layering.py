"""Imports flow one way: gateway -> routing/policies -> nothing of the gateway's."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "routing": {"gateway", "policies", "starlette", "httpx", "aiohttp", "uvicorn"},
    "policies": {"gateway", "starlette", "httpx", "aiohttp", "uvicorn"},
    "simulator": {"gateway", "routing", "policies"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_public_api_is_explicit() -> None:
    import gateway

    assert sorted(gateway.__all__) == ["ConfigError", "GatewayConfig", "GatewayError", "create_app",
                                       "load_config", "parse_config"]
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None
