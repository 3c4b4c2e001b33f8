"""The observability profile's files, checked with the tools' own parsers where this machine has one.

Only Prometheus runs here (Debian packages it); the Collector, Jaeger and Grafana images come only
from a registry, so their configs are cross-checked in tests/unit/test_compose.py instead.
"""
from __future__ import annotations

from pathlib import Path

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
