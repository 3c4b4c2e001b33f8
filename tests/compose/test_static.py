"""The observability profile's files, checked with the tools' own parsers where this machine has one.

Only Prometheus runs here (Debian packages it); the Collector, Jaeger and Grafana images come only
from a registry, so their configs are cross-checked in tests/unit/test_compose.py instead.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.compose import harness

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "config" / "observability"


def test_compose_file_parses_with_every_profile_service() -> None:
    services = harness.compose_config()["services"]
    assert set(services) == {*harness.CORE_SERVICES, "otel-collector", "jaeger", "prometheus", "grafana"}


def test_promtool_accepts_the_prometheus_config() -> None:
    out = harness.podman("run", "--rm", "--network", "none", "-v", f"{OBS / 'prometheus.yml'}:/p.yml:ro",
                         "--entrypoint", "promtool", harness.PROMETHEUS_IMAGE, "check", "config", "/p.yml",
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    bad = tmp_path / "p.yml"
    bad.write_text((OBS / "prometheus.yml").read_text().replace("scrape_interval: 5s", "scrape_interval: 5 s"))
    out = harness.podman("run", "--rm", "--network", "none", "-v", f"{bad}:/p.yml:ro", "--entrypoint",
                         "promtool", harness.PROMETHEUS_IMAGE, "check", "config", "/p.yml", check=False)
    assert out.returncode != 0


def _dashboard_rules(tmp_path: Path, exprs: list[str]) -> Path:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"gravity:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _promtool_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return harness.podman("run", "--rm", "--network", "none", "-v", f"{path}:/r.yml:ro", "--entrypoint",
                          "promtool", harness.PROMETHEUS_IMAGE, "check", "rules", "/r.yml", check=False)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query through Prometheus's own PromQL parser (as a recording rule: promtool parses its expr)."""
    dashboard = json.loads((OBS / "grafana" / "dashboards" / "gravity.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    out = _promtool_rules(_dashboard_rules(tmp_path, exprs))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout + out.stderr


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    out = _promtool_rules(_dashboard_rules(tmp_path, ["sum by (backend (rate(gravity_requests_total[1m]))"]))
    assert out.returncode != 0
