"""Cross-checks of the compose stack's observability profile: collector, Prometheus and Grafana configs
against the stack and the gateway's own metric names (no Docker engine needed).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.support.compose_checks import (
    DOCKERFILE,
    REPO,
    argv_of,
    flag_value,
    gravity_subcommand,
    service_argv,
)


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repository path, for bind mounts of files in the repository."""
    out: dict[str, Path] = {}
    for v in service.get("volumes") or []:
        source, target, *_ = str(v).split(":") + [""]
        if source.startswith("."):
            out[target] = (REPO / source).resolve()
    return out


def metric_families() -> set[str]:
    """Every metric the gateway and the simulator declare, with the suffixes Prometheus sees."""
    names: set[str] = set()
    decl = re.compile(r"""\b(Counter|Gauge|Histogram|counter|gauge|hist|CounterMetricFamily|GaugeMetricFamily)"""
                      r"""\(\s*["']([a-zA-Z_:][a-zA-Z0-9_:]*)["']""")
    for path in [*(REPO / "gateway").rglob("*.py"), *(REPO / "simulator").rglob("*.py")]:
        for kind, name in decl.findall(path.read_text()):
            base = name.removesuffix("_total")
            if kind.lower().startswith("counter"):
                names |= {base + "_total"}
            elif kind.lower().startswith("hist"):
                names |= {base + "_bucket", base + "_sum", base + "_count"}
            else:
                names.add(name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[])", expr)) - {"by", "without"}


def dashboard_problems(dashboard: dict[str, Any], datasource_uid: str, known: set[str]) -> list[str]:
    problems: list[str] = []
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("dashboard: no uid or title")
    panels = dashboard.get("panels") or []
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids):
        problems.append(f"dashboard: panel ids repeat {ids}")
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            problems.append(f"panel {p.get('title')!r}: gridPos {g} outside the 24-column grid")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"panel {p.get('title')!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = str(p.get("title"))
        targets = p.get("targets") or []
        if not targets or len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"panel {p.get('title')!r}: no targets, or refIds repeat")
        for item in [p, *targets]:
            if (item.get("datasource") or {}).get("uid") != datasource_uid:
                problems.append(f"panel {p.get('title')!r}: datasource is not {datasource_uid}")
        for t in targets:
            unknown = promql_metric_names(str(t.get("expr", ""))) - known
            if not t.get("expr") or unknown:
                problems.append(f"panel {p.get('title')!r}: expr reads undeclared metrics {sorted(unknown)}")
    return problems


_COLLECTOR_SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")
_COMPONENT_ID = re.compile(r"^[a-zA-Z][0-9a-zA-Z_]*(/[^/\s]+)?$")
_PIPELINE_ID = re.compile(r"^(traces|metrics|logs|profiles)(/[^/\s]+)?$")


def collector_problems(cfg: Any) -> list[str]:
    """The Collector's documented configuration format (opentelemetry.io/docs/collector/configuration):
    component sections keyed by `type[/name]`, a `service` whose pipelines (`traces|metrics|logs[/name]`)
    each take at least one receiver and one exporter, all defined; plus what this stack needs of it."""
    if not isinstance(cfg, dict):
        return ["otel-collector: the config is not a mapping"]
    problems = [f"otel-collector: unknown top-level key {k!r}" for k in cfg
                if k not in (*_COLLECTOR_SECTIONS, "service")]
    for section in _COLLECTOR_SECTIONS:
        for cid in cfg.get(section) or {}:
            if not _COMPONENT_ID.match(str(cid)):
                problems.append(f"otel-collector: {section}.{cid}: not a component id (type[/name])")
    service = cfg.get("service") or {}
    for ext in service.get("extensions") or []:
        if ext not in (cfg.get("extensions") or {}):
            problems.append(f"otel-collector: service.extensions names undefined {ext!r}")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        problems.append("otel-collector: service.pipelines is empty")
    for pname, pipe in pipelines.items():
        if not _PIPELINE_ID.match(str(pname)):
            problems.append(f"otel-collector: pipelines.{pname}: not traces, metrics or logs[/name]")
        pipe = pipe or {}
        for kind in ("receivers", "exporters"):
            if not pipe.get(kind):
                problems.append(f"otel-collector: pipelines.{pname} has no {kind}")
        for kind in ("receivers", "processors", "exporters"):
            for ref in pipe.get(kind) or []:
                if ref not in (cfg.get(kind) or {}) and ref not in (cfg.get("connectors") or {}):
                    problems.append(f"otel-collector: pipelines.{pname}.{kind} names undefined {ref!r}")
    traces = [p or {} for n, p in pipelines.items() if str(n).split("/")[0] == "traces"]
    exporters = cfg.get("exporters") or {}
    to_jaeger = [e for t in traces for e in t.get("exporters") or []
                 if str((exporters.get(e) or {}).get("endpoint", "")) == "jaeger:4317"]
    if not to_jaeger:
        problems.append("otel-collector: no traces pipeline exports to jaeger:4317")
    otlp_in = [r for t in traces for r in t.get("receivers") or [] if str(r).split("/")[0] == "otlp"]
    http = ((((cfg.get("receivers") or {}).get(otlp_in[0]) if otlp_in else None) or {}).get("protocols") or {}).get(
        "http")
    endpoint = str((http or {}).get("endpoint", "")) if isinstance(http, dict) else ""
    # The receiver's own default is localhost:4318 (since v0.104): inside a container that refuses the gateways.
    if not endpoint.endswith(":4318") or endpoint.rsplit(":", 1)[0] not in ("0.0.0.0", "", "[::]"):
        problems.append(f"otel-collector: OTLP/HTTP must listen on 0.0.0.0:4318 for the gateways (got {endpoint!r})")
    return problems


def observability_problems(compose: dict[str, Any]) -> list[str]:
    """The observability services' mounted configs agree with the services they point at."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    dockerfile = DOCKERFILE.read_text()

    def mounted(service: str, target: str) -> Path | None:
        path = _mounts(services.get(service) or {}).get(target)
        if path is None or not path.exists():
            problems.append(f"services.{service}: nothing from the repository mounted at {target}")
            return None
        return path

    # Prometheus scrapes every gateway and every simulator, where they listen.
    want = set()
    for name, s in services.items():
        argv = service_argv(s, dockerfile)
        sub = gravity_subcommand(argv)
        if sub == "sim":
            want.add(f"{name}:{flag_value(argv, '--port')}")
        elif sub == "serve":
            want.add(f"{name}:8080")
    prom = services.get("prometheus") or {}
    conf_flag = flag_value(argv_of(prom.get("command")), "--config.file") or "/etc/prometheus/prometheus.yml"
    path = mounted("prometheus", conf_flag)
    if path is not None:
        cfg = yaml.safe_load(path.read_text())
        got = {t for job in cfg.get("scrape_configs") or [] for sc in job.get("static_configs") or []
               for t in sc.get("targets") or []}
        if got != want:
            problems.append(f"prometheus.yml scrapes {sorted(got)}, the stack serves metrics at {sorted(want)}")

    # The Collector: its documented config format, traces in over OTLP/HTTP and on to Jaeger.
    path = mounted("otel-collector", "/etc/otelcol/config.yaml")
    if path is not None:
        problems += collector_problems(yaml.safe_load(path.read_text()))
    # The gateways export with the standard variable (tracing stays off while it is empty).
    for name in ("gateway", "gateway-b"):
        env = (services.get(name) or {}).get("environment") or {}
        if "OTEL_EXPORTER_OTLP_ENDPOINT" not in env:
            problems.append(f"services.{name}: no OTEL_EXPORTER_OTLP_ENDPOINT to point at the collector")

    # Grafana: the provisioned datasource is the compose Prometheus, and the dashboard reads it.
    prov = mounted("grafana", "/etc/grafana/provisioning")
    dash_dir = mounted("grafana", "/var/lib/grafana/dashboards")
    if prov is not None and dash_dir is not None:
        sources = [d for f in sorted((prov / "datasources").glob("*.yaml"))
                   for d in yaml.safe_load(f.read_text()).get("datasources") or []]
        uids = {d.get("uid") for d in sources if d.get("url") == "http://prometheus:9090"}
        if len(uids) != 1:
            problems.append(f"grafana: expected one datasource at http://prometheus:9090, got {sources}")
        paths = {str(pr.get("options", {}).get("path")) for f in (prov / "dashboards").glob("*.yaml")
                 for pr in yaml.safe_load(f.read_text()).get("providers") or []}
        if paths != {"/var/lib/grafana/dashboards"}:
            problems.append(f"grafana: dashboard providers read {paths}, the dashboards are mounted elsewhere")
        dashboards = sorted(dash_dir.glob("*.json"))
        if not dashboards:
            problems.append("grafana: no dashboard JSON")
        known = metric_families() | {"up"}
        for f in dashboards:
            problems += [f"{f.name}: {p}" for p in
                         dashboard_problems(json.loads(f.read_text()), next(iter(uids), ""), known)]
    return problems


