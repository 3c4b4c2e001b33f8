"""Imports flow one way: gateway -> routing/policies -> nothing of the gateway's.

One exception, by design: the virtual-time evaluator (routing/eval) drives the gateway's own attempt
state machine, circuit breakers and retry budget, so a simulated failover makes the decisions a real
one makes. Those policies modules are pure (no I/O, clock injected) and import nothing of routing's
or the gateway's, so routing/eval may import exactly them, and nothing else of policies/.
"""
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

# The pure policies modules routing/eval may import (the evaluator's failover: routing/eval/faults.py).
EVAL_MAY_IMPORT = {"policies.attempts", "policies.circuit", "policies.retry_budget", "policies.resilience"}
PURE_POLICIES_MAY_IMPORT = {"policies", "__future__", "collections", "dataclasses", "enum", "typing",
                            "pydantic"}


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imports(path: Path) -> set[str]:
    return {m.split(".")[0] for m in _modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        modules = _modules(path)
        if path.is_relative_to(ROOT / "routing" / "eval"):
            modules -= EVAL_MAY_IMPORT
        bad = {m.split(".")[0] for m in modules} & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_the_policies_the_evaluator_imports_stay_pure() -> None:
    # No I/O and nothing of the gateway's: what makes the exception above safe.
    for module in sorted(EVAL_MAY_IMPORT):
        path = ROOT / (module.replace(".", "/") + ".py")
        bad = _imports(path) - PURE_POLICIES_MAY_IMPORT
        inner = {m for m in _modules(path) if m.startswith("policies.")} - EVAL_MAY_IMPORT
        assert not bad and not inner, f"{module} imports {sorted(bad | inner)}"


def test_public_api_is_explicit() -> None:
    import gateway

    assert sorted(gateway.__all__) == ["ConfigError", "GatewayConfig", "GatewayError", "create_app",
                                       "load_config", "parse_config"]
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None
