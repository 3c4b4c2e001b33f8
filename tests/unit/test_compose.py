"""docker-compose.yml, config/compose.yaml and the Dockerfile agree with each other and with the demo.

No Docker engine is needed: the files are parsed and cross-checked. `compose_problems` returns every
disagreement it finds, so the mutation tests below prove each check can fail.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
OBS = REPO / "config" / "observability"
CONFIG_IN_CONTAINER = "/etc/gravity/gravity.yaml"
SIM_COUNT = 3
GATEWAY_COUNT = 2  # two replicas on their own host ports: shared limits and state are testable
DRAIN_TIMEOUT_S = 30.0  # the gateway's drain_timeout_s default (resilience issue)
OBSERVABILITY = {"otel-collector": "OTELCOL_IMAGE", "jaeger": "JAEGER_IMAGE",
                 "prometheus": "PROMETHEUS_IMAGE", "grafana": "GRAFANA_IMAGE"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's `${VAR}` / `${VAR:-default}` substitution, with `env` (default: nothing set)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(text: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    data = interpolate(yaml.safe_load(text), env)
    assert isinstance(data, dict)
    return data


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        parsed = yaml.safe_load(args)  # JSON exec form is valid YAML
        return [str(a) for a in parsed]
    return ["/bin/sh", "-c", args]


def image_entrypoint(dockerfile: str) -> tuple[list[str], list[str]]:
    """The image's final ENTRYPOINT and CMD."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for word, args in dockerfile_instructions(dockerfile):
        if word == "ENTRYPOINT":
            entrypoint = _exec_form(args)
            cmd = []  # Docker resets CMD when ENTRYPOINT is set after it
        elif word == "CMD":
            cmd = _exec_form(args)
    return entrypoint, cmd


def service_argv(service: dict[str, Any], dockerfile: str) -> list[str]:
    """What a service's container runs: its entrypoint (or the image's) followed by its command."""
    image_ep, image_cmd = image_entrypoint(dockerfile) if "build" in service else ([], [])
    entrypoint = _argv(service["entrypoint"]) if "entrypoint" in service else image_ep
    command = _argv(service["command"]) if "command" in service else image_cmd
    return entrypoint + command


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _gravity_subcommand(argv: list[str]) -> str | None:
    """`sim` for ["gravity", "sim", ...] (or `python -m gateway sim ...`), else None."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "gravity" or (arg == "gateway" and i > 0 and argv[i - 1] == "-m"):
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _published(ports: list[Any]) -> dict[int, int]:
    """container port -> host port, from short ("127.0.0.1:8080:8080") or long syntax."""
    out: dict[int, int] = {}
    for p in ports or []:
        if isinstance(p, dict):
            out[int(p["target"])] = int(p.get("published") or p["target"])
            continue
        parts = str(p).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def _mounted_config(service: dict[str, Any]) -> Path | None:
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            source, target = v.get("source"), v.get("target")
        else:
            source, target, *_ = str(v).split(":") + [""]
        if target == CONFIG_IN_CONTAINER and source:
            return (REPO / str(source)).resolve()
    return None


def compose_problems(compose: dict[str, Any], dockerfile: str,
                     config_override: GatewayConfig | None = None) -> list[str]:
    """Every way the compose stack would not come up as `gravity demo` does; empty when it agrees."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}

    # The Dockerfile builds the project with pip and runs the `gravity` console script.
    problems += dockerfile_problems(dockerfile)
    ep, cmd = image_entrypoint(dockerfile)
    if not (ep + cmd) or Path((ep + cmd)[0]).name != "gravity":
        problems.append(f"Dockerfile: ENTRYPOINT/CMD {ep + cmd} does not run `gravity`")

    built = {name for name, s in services.items() if "build" in s}
    dockerfiles = {str((s["build"] if isinstance(s["build"], dict) else {}).get("dockerfile", "Dockerfile"))
                   for name, s in services.items() if name in built}
    if dockerfiles - {"Dockerfile"}:
        problems.append(f"services build from {sorted(dockerfiles)}, not the one Dockerfile")

    # Simulators: `gravity sim --host 0.0.0.0 --port P --model M`, keyed by (service, port).
    sims: dict[tuple[str, int], str] = {}
    for name, s in services.items():
        argv = service_argv(s, dockerfile)
        if _gravity_subcommand(argv) != "sim":
            continue
        if name not in built:
            problems.append(f"services.{name}: a simulator not built from the project Dockerfile")
        host, port, model = _flag(argv, "--host"), _flag(argv, "--port"), _flag(argv, "--model")
        if host != "0.0.0.0":
            problems.append(f"services.{name}: simulator listens on {host!r}, unreachable from other containers")
        if port is None or not port.isdigit() or model is None:
            problems.append(f"services.{name}: simulator needs --port and --model, got {argv}")
            continue
        sims[(name, int(port))] = model
    if len(sims) != SIM_COUNT:
        problems.append(f"expected {SIM_COUNT} simulator services like `gravity demo`, found {len(sims)}")

    # The gateways: `gravity serve --config /etc/gravity/gravity.yaml` with config/compose.yaml there.
    gateways = [n for n, s in services.items() if _gravity_subcommand(service_argv(s, dockerfile)) == "serve"]
    if len(gateways) != GATEWAY_COUNT:
        problems.append(f"expected {GATEWAY_COUNT} `gravity serve` services, found {gateways}")
        if not gateways:
            return problems
    host_ports: dict[int, str] = {}
    for gw_name in gateways:
        problems += _gateway_problems(gw_name, services[gw_name], services, sims, built, dockerfile,
                                      config_override, host_ports)
    return problems


def _gateway_problems(gw_name: str, gw: dict[str, Any], services: dict[str, dict[str, Any]],
                      sims: dict[tuple[str, int], str], built: set[str], dockerfile: str,
                      config_override: GatewayConfig | None, host_ports: dict[int, str]) -> list[str]:
    problems: list[str] = []
    if gw_name not in built:
        problems.append(f"services.{gw_name}: the gateway is not built from the project Dockerfile")
    gw_argv = service_argv(gw, dockerfile)
    if _flag(gw_argv, "--config") != CONFIG_IN_CONTAINER:
        problems.append(f"services.{gw_name}: serve --config is {_flag(gw_argv, '--config')!r}, "
                        f"not {CONFIG_IN_CONTAINER}")
    mounted = _mounted_config(gw)
    if mounted is None:
        problems.append(f"services.{gw_name}: nothing mounted at {CONFIG_IN_CONTAINER}")
        return problems
    try:
        cfg = config_override or load_config(mounted)
    except ConfigError as exc:
        problems.append(f"{mounted.name}: {exc}")
        return problems

    # Each backend is a simulator service, at the port it listens on, serving the model it runs.
    used: set[tuple[str, int]] = set()
    for i, b in enumerate(cfg.backends):
        url = urlsplit(b.url)
        key = (url.hostname or "", url.port or 80)
        if key not in sims:
            problems.append(f"backends[{i}].url {b.url}: no simulator service listens at {key[0]}:{key[1]}")
            continue
        used.add(key)
        served = set(_served_names(services[key[0]], dockerfile))
        if b.models is not None and not set(b.models) <= served:
            problems.append(f"backends[{i}].models {b.models}: {key[0]} serves {sorted(served)}")
        if _depends_on(gw).get(key[0]) != "service_healthy":
            problems.append(f"services.{gw_name}.depends_on lacks {key[0]} (service_healthy)")
    for key in sorted(set(sims) - used):
        problems.append(f"simulator service {key[0]} is not a backend in {mounted.name}")

    # Redis: the compose service, on the port redis-server listens on.
    redis = services.get("redis")
    if redis is None:
        problems.append("no `redis` service")
    elif cfg.state.redis_url is None:
        problems.append(f"{mounted.name}: state.redis_url is unset (the gateway would embed its own Redis)")
    else:
        url = urlsplit(cfg.state.redis_url)
        redis_port = int(_flag(_argv(redis.get("command")), "--port") or 6379)
        if url.scheme != "redis" or url.hostname != "redis" or (url.port or 6379) != redis_port:
            problems.append(f"state.redis_url {cfg.state.redis_url}: the redis service is redis:{redis_port}")
        if _depends_on(gw).get("redis") != "service_healthy":
            problems.append(f"services.{gw_name}.depends_on lacks redis (service_healthy)")

    # The published port reaches the port the gateway listens on, on all container interfaces, and
    # no two gateways share a host port.
    published = _published(gw.get("ports") or [])
    if cfg.server.port not in published:
        problems.append(f"services.{gw_name}.ports {gw.get('ports')}: server.port {cfg.server.port} "
                        "is not published")
    else:
        host = published[cfg.server.port]
        if host in host_ports:
            problems.append(f"services.{gw_name}: host port {host} is also {host_ports[host]}'s")
        host_ports[host] = gw_name
    if cfg.server.host not in ("0.0.0.0", "::"):
        problems.append(f"server.host {cfg.server.host}: unreachable through the published port")
    drain = float(getattr(cfg.server, "drain_timeout_s", DRAIN_TIMEOUT_S))
    grace = _seconds(gw.get("stop_grace_period", "10s"))
    if grace < drain:
        problems.append(f"services.{gw_name}.stop_grace_period {grace:g}s is shorter than the drain "
                        f"timeout {drain:g}s: SIGKILL would cut in-flight streams")
    return problems


def _served_names(service: dict[str, Any], dockerfile: str) -> list[str]:
    argv = service_argv(service, dockerfile)
    if "--served-model-name" in argv:
        i = argv.index("--served-model-name") + 1
        names: list[str] = []
        while i < len(argv) and not argv[i].startswith("--"):
            names.append(argv[i])
            i += 1
        return names
    model = _flag(argv, "--model")
    return [model] if model else []


def _seconds(value: Any) -> float:
    """A compose duration ("1m30s", "40s", "500ms") in seconds."""
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)(ms|us|h|m|s)", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def dockerfile_problems(text: str) -> list[str]:
    """The image a user builds from the index and the tests build offline: one Dockerfile."""
    problems: list[str] = []
    ins = dockerfile_instructions(text)
    froms = [a for w, a in ins if w == "FROM"]
    first_from = next((i for i, (w, _) in enumerate(ins) if w == "FROM"), len(ins))
    base_args = [a for w, a in ins[:first_from] if w == "ARG" and a.startswith("BASE_IMAGE=")]
    if base_args != ["BASE_IMAGE=python:3.11-slim"]:
        problems.append(f"Dockerfile: `ARG BASE_IMAGE=python:3.11-slim` before FROM, got {base_args}")
    if not froms or not all(f.split()[0] == "${BASE_IMAGE}" for f in froms):
        problems.append(f"Dockerfile: every stage must start FROM ${{BASE_IMAGE}}, got {froms}")
    runs = " ".join(a for w, a in ins if w == "RUN")
    copied = [a.split()[-1] for w, a in ins if w == "COPY" and a.split()[:1] == ["."]]
    if not copied or not any(f"pip install {d}" in runs or f"pip install {d}/" in runs for d in copied):
        problems.append("Dockerfile: no `pip install` of the copied project (a user's index build)")
    if "--no-index" not in runs or "GRAVITY_WHEELS" not in runs:
        problems.append("Dockerfile: no offline install from prebuilt wheels (--no-index, GRAVITY_WHEELS)")
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):] if froms else ins
    users = [a for w, a in final if w == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"Dockerfile: the final stage runs as root (USER {users})")
    health = [a for w, a in final if w == "HEALTHCHECK"]
    envs = " ".join(a for w, a in final if w == "ENV")
    if not health or ("/health" not in health[-1] and "GRAVITY_HEALTH_URL" not in health[-1]):
        problems.append("Dockerfile: no HEALTHCHECK on /health")
    elif "GRAVITY_HEALTH_URL" in health[-1] and "GRAVITY_HEALTH_URL=http://127.0.0.1:8080/health" not in envs:
        problems.append("Dockerfile: GRAVITY_HEALTH_URL does not default to the gateway's /health")
    if [a for w, a in final if w == "STOPSIGNAL"] != ["SIGTERM"]:
        problems.append("Dockerfile: STOPSIGNAL is not SIGTERM, the signal the gateway drains on")
    m = re.search(r"TIKTOKEN_CACHE_DIR=(\S+)", envs)
    if m is None or not any(w == "COPY" and a.split() == ["config/tiktoken", m.group(1)] for w, a in final):
        problems.append("Dockerfile: TIKTOKEN_CACHE_DIR unset or config/tiktoken not copied there")
    return problems


def stack_problems(raw: dict[str, Any], compose: dict[str, Any]) -> list[str]:
    """Overridable images, health, persistence, profiles: what makes the file runnable offline and
    tell a user when it is up. `raw` is the file before interpolation."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    raw_services: dict[str, dict[str, Any]] = raw.get("services") or {}
    for name, s in raw_services.items():
        m = _VAR.fullmatch(str(s.get("image", "")))
        if m is None or not m.group(2):
            problems.append(f"services.{name}.image {s.get('image')!r} is not ${{VAR:-default}}")
            continue
        want = OBSERVABILITY.get(name) or ("REDIS_IMAGE" if name == "redis" else "GRAVITY_IMAGE")
        if m.group(1) != want:
            problems.append(f"services.{name}.image is set by {m.group(1)}, not {want}")
        if "build" in s and interpolate(s["build"].get("args", {}).get("BASE_IMAGE")) != "python:3.11-slim":
            problems.append(f"services.{name}.build.args.BASE_IMAGE must default to python:3.11-slim")
        if "build" in s and not str(s["build"].get("args", {}).get("BASE_IMAGE", "")).startswith(
                "${GRAVITY_BASE_IMAGE"):
            problems.append(f"services.{name}.build.args.BASE_IMAGE is not set from GRAVITY_BASE_IMAGE")
    for name, s in services.items():
        profiles = s.get("profiles") or []
        if name in OBSERVABILITY:
            if profiles != ["observability"]:
                problems.append(f"services.{name}: not in the `observability` profile")
            continue
        if profiles:
            problems.append(f"services.{name}: a core service in profiles {profiles}")
        test = (s.get("healthcheck") or {}).get("test")
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"services.{name}: no healthcheck test")
    redis = services.get("redis") or {}
    argv = _argv(redis.get("command"))
    data_dir = _flag(argv, "--dir")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in redis.get("volumes") or []}
    if _flag(argv, "--appendonly") != "yes":
        problems.append("services.redis: persistence off (--appendonly yes)")
    if data_dir is None or mounts.get(data_dir) not in (compose.get("volumes") or {}):
        problems.append(f"services.redis: --dir {data_dir} is not a named volume ({mounts})")
    return problems


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repository path, for bind mounts of files in the repository."""
    out: dict[str, Path] = {}
    for v in service.get("volumes") or []:
        source, target, *_ = str(v).split(":") + [""]
        if source.startswith("."):
            out[target] = (REPO / source).resolve()
    return out


def _metric_families() -> set[str]:
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
        sub = _gravity_subcommand(argv)
        if sub == "sim":
            want.add(f"{name}:{_flag(argv, '--port')}")
        elif sub == "serve":
            want.add(f"{name}:8080")
    prom = services.get("prometheus") or {}
    conf_flag = _flag(_argv(prom.get("command")), "--config.file") or "/etc/prometheus/prometheus.yml"
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
        known = _metric_families() | {"up"}
        for f in dashboards:
            problems += [f"{f.name}: {p}" for p in
                         dashboard_problems(json.loads(f.read_text()), next(iter(uids), ""), known)]
    return problems


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """service -> condition (`service_started` for the short list form)."""
    deps = service.get("depends_on") or []
    if isinstance(deps, dict):
        return {k: str((v or {}).get("condition", "service_started")) for k, v in deps.items()}
    return {str(d): "service_started" for d in deps}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_compose_stack_agrees(compose: dict[str, Any], dockerfile: str) -> None:
    assert compose_problems(compose, dockerfile) == []


def test_compose_config_mirrors_the_demo(compose: dict[str, Any]) -> None:
    mounted = _mounted_config(compose["services"]["gateway"])
    assert mounted is not None
    ours, demo = load_config(mounted), load_config(REPO / "config" / "demo.yaml")
    # The same backends, each serving the demo's models plus the metered name the limit test uses.
    assert [(b.name, b.kind, urlsplit(b.url).port) for b in ours.backends] == \
        [(b.name, b.kind, urlsplit(b.url).port) for b in demo.backends]
    for b, d in zip(ours.backends, demo.backends, strict=True):
        assert b.models is not None and d.models is not None
        assert b.models[: len(d.models)] == d.models and set(b.models) - set(d.models) == {"sim-llama-metered"}
    limits = ours.policies.tenants["default"].models["sim-llama-metered"]
    assert limits.rpm is not None and ours.policies.rate_limits.enabled
    assert ours.routing == demo.routing
    assert ours.server.port == demo.server.port


def test_stack_is_runnable_offline_and_says_when_it_is_up(compose: dict[str, Any]) -> None:
    assert stack_problems(yaml.safe_load(COMPOSE.read_text()), compose) == []


def test_observability_configs_agree_with_the_stack(compose: dict[str, Any]) -> None:
    assert observability_problems(compose) == []


def test_images_follow_the_environment() -> None:
    env = {"GRAVITY_IMAGE": "localhost/g:1", "REDIS_IMAGE": "localhost/r:1", "GRAFANA_IMAGE": "localhost/gf:1",
           "GRAVITY_BASE_IMAGE": "localhost/base:1"}
    services = load_compose(COMPOSE.read_text(), env)["services"]
    assert services["gateway"]["image"] == services["vllm-0"]["image"] == "localhost/g:1"
    assert services["gateway"]["build"]["args"]["BASE_IMAGE"] == "localhost/base:1"
    assert services["redis"]["image"] == "localhost/r:1" and services["grafana"]["image"] == "localhost/gf:1"


def test_dockerfile_runs_gravity_serve_by_default(dockerfile: str) -> None:
    ep, cmd = image_entrypoint(dockerfile)
    argv = ep + cmd
    assert _gravity_subcommand(argv) == "serve" and _flag(argv, "--config") == CONFIG_IN_CONTAINER


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".gravity"} <= ignored


def _set(path: str, value: Any) -> Any:
    def mutate(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _delete(path: str) -> Any:
    def mutate(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


MUTATIONS = {
    "sim port differs from backend url": _set("services.vllm-1.command",
                                              ["sim", "--host", "0.0.0.0", "--port", "9102", "--model", "sim-llama"]),
    "sim serves another model": _set("services.vllm-0.command",
                                     ["sim", "--host", "0.0.0.0", "--port", "9001", "--model", "other"]),
    "sim on loopback": _set("services.vllm-2.command",
                            ["sim", "--host", "127.0.0.1", "--port", "9003", "--model", "sim-llama"]),
    "sim service renamed": lambda c: c["services"].__setitem__("sim-0", c["services"].pop("vllm-0")),
    "sim missing": _delete("services.vllm-2"),
    "redis missing": _delete("services.redis"),
    "redis on another port": _set("services.redis.command", ["redis-server", "--port", "6380"]),
    "gateway port not published": _set("services.gateway.ports", ["127.0.0.1:8080:9090"]),
    "config not mounted": _set("services.gateway.volumes", ["./config/demo.yaml:/etc/gravity/other.yaml:ro"]),
    "demo config mounted": _set("services.gateway.volumes", ["./config/demo.yaml:/etc/gravity/gravity.yaml:ro"]),
    "serve reads another path": _set("services.gateway.command", ["serve", "--config", "/gravity.yaml"]),
    "gateway not gravity": _set("services.gateway.entrypoint", ["python", "-m", "http.server"]),
    "gateway does not wait for a sim": _set("services.gateway.depends_on", ["redis", "vllm-0", "vllm-1"]),
    "gateway waits for a sim to start, not to be healthy": _set("services.gateway-b.depends_on",
                                                                ["redis", "vllm-0", "vllm-1", "vllm-2"]),
    "second gateway missing": _delete("services.gateway-b"),
    "gateways share a host port": _set("services.gateway-b.ports", ["127.0.0.1:8080:8080"]),
    "grace shorter than the drain": _set("services.gateway.stop_grace_period", "10s"),
}

STACK_MUTATIONS = {
    "image hard-coded": _set("services.grafana.image", "grafana/grafana:11.5.2"),
    "image variable shared": _set("services.jaeger.image", "${GRAFANA_IMAGE:-jaegertracing/jaeger:2.3.0}"),
    "base not from GRAVITY_BASE_IMAGE": _set("services.vllm-0.build", {"context": ".", "args": {
        "BASE_IMAGE": "python:3.11-slim"}}),
    "redis persistence off": _set("services.redis.command", ["redis-server", "--port", "6379", "--dir", "/data"]),
    "redis data not in a volume": _set("services.redis.volumes", []),
    "no healthcheck": _delete("services.vllm-2.healthcheck"),
    "observability in the core stack": _delete("services.prometheus.profiles"),
}

OBS_MUTATIONS = {
    "prometheus config not mounted": _set("services.prometheus.volumes", []),
    "collector config not mounted": _set("services.otel-collector.volumes", []),
    "dashboards mounted elsewhere": _set("services.grafana.volumes", [
        "./config/observability/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./config/observability/grafana/dashboards:/dashboards:ro"]),
    "gateway without the OTLP endpoint variable": _set("services.gateway.environment", {"OTEL_SERVICE_NAME": "g"}),
    "a sim prometheus does not scrape": lambda c: c["services"].__setitem__("vllm-3", {
        **c["services"]["vllm-2"], "command": ["sim", "--host", "0.0.0.0", "--port", "9004", "--model", "sim-llama"]}),
}


@pytest.mark.parametrize("mutation", list(STACK_MUTATIONS), ids=list(STACK_MUTATIONS))
def test_each_stack_problem_is_caught(mutation: str) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    STACK_MUTATIONS[mutation](raw)
    assert stack_problems(raw, interpolate(raw)) != []


@pytest.mark.parametrize("mutation", list(OBS_MUTATIONS), ids=list(OBS_MUTATIONS))
def test_each_observability_disagreement_is_caught(compose: dict[str, Any], mutation: str) -> None:
    broken = copy.deepcopy(compose)
    OBS_MUTATIONS[mutation](broken)
    assert observability_problems(broken) != []


def _collector() -> dict[str, Any]:
    data = yaml.safe_load((OBS / "otel-collector.yaml").read_text())
    assert isinstance(data, dict)
    return data


COLLECTOR_MUTATIONS = {
    "http on localhost": _set("receivers.otlp.protocols.http.endpoint", "localhost:4318"),
    "http on another port": _set("receivers.otlp.protocols.http.endpoint", "0.0.0.0:4319"),
    "no http protocol": _delete("receivers.otlp.protocols.http"),
    "unknown section": _set("exportrs", {}),
    "bad component id": _set("processors", {"batch/": {}}),
    "pipeline without exporters": _set("service.pipelines.traces.exporters", []),
    "pipeline names an undefined processor": _set("service.pipelines.traces.processors", ["memory_limiter"]),
    "not a pipeline type": lambda c: c["service"]["pipelines"].__setitem__(
        "spans", c["service"]["pipelines"].pop("traces")),
    "undefined extension": _set("service.extensions", ["health_check"]),
    "jaeger not the exporter": _set("exporters.otlp/jaeger.endpoint", "tempo:4317"),
}


def test_collector_config_follows_the_documented_format() -> None:
    assert collector_problems(_collector()) == []


@pytest.mark.parametrize("mutation", list(COLLECTOR_MUTATIONS), ids=list(COLLECTOR_MUTATIONS))
def test_each_collector_problem_is_caught(mutation: str) -> None:
    cfg = _collector()
    COLLECTOR_MUTATIONS[mutation](cfg)
    assert collector_problems(cfg) != []


def _dashboard() -> dict[str, Any]:
    data = json.loads((OBS / "grafana" / "dashboards" / "gravity.json").read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("mutation", ["renamed metric", "overlap", "datasource", "repeated refId"])
def test_each_dashboard_problem_is_caught(mutation: str) -> None:
    dash = _dashboard()
    p0, p1 = dash["panels"][0], dash["panels"][1]
    if mutation == "renamed metric":
        p0["targets"][0]["expr"] = p0["targets"][0]["expr"].replace("gravity_requests_total", "gravity_request_total")
    elif mutation == "overlap":
        p1["gridPos"] = dict(p0["gridPos"])
    elif mutation == "datasource":
        p1["datasource"] = {"type": "prometheus", "uid": "other"}
    else:
        p0["targets"].append(dict(p0["targets"][0]))
    assert dashboard_problems(dash, "gravity-prometheus", _metric_families() | {"up"}) != []


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"])
    for metric in ("gravity_requests_total", "gravity_time_to_first_token_seconds_bucket",
                   "vllm:prefix_cache_hits_total", "gravity_admission_rejections_total",
                   "gravity_upstream_errors_total", "gravity_backend_tokens_total",
                   "gravity_ratelimit_rejections_total", "gravity_circuit_state",
                   "gravity_time_per_output_token_seconds_bucket", "gravity_routing_decisions_total"):
        assert metric in exprs, metric


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
def test_each_disagreement_is_caught(compose: dict[str, Any], dockerfile: str, mutation: str) -> None:
    broken = copy.deepcopy(compose)
    MUTATIONS[mutation](broken)
    assert compose_problems(broken, dockerfile) != []


@pytest.mark.parametrize("config", [
    {"server": {"host": "127.0.0.1", "port": 8080}, "state": {"redis_url": "redis://redis:6379/0"},
     "backends": [{"name": f"vllm-{i}", "url": f"http://vllm-{i}:900{i + 1}"} for i in range(3)]},
    {"server": {"host": "0.0.0.0", "port": 8080},
     "backends": [{"name": f"vllm-{i}", "url": f"http://vllm-{i}:900{i + 1}"} for i in range(3)]},
    {"server": {"host": "0.0.0.0", "port": 8080}, "state": {"redis_url": "redis://localhost:6379/0"},
     "backends": [{"name": f"vllm-{i}", "url": f"http://vllm-{i}:900{i + 1}"} for i in range(3)]},
    {"server": {"host": "0.0.0.0", "port": 8080}, "state": {"redis_url": "redis://redis:6379/0"},
     "backends": [{"name": f"vllm-{i}", "url": f"http://127.0.0.1:900{i + 1}"} for i in range(3)]},
], ids=["gateway on loopback", "embedded redis", "redis on localhost", "backends on loopback"])
def test_bad_mounted_config_is_caught(compose: dict[str, Any], dockerfile: str, config: dict[str, Any]) -> None:
    assert compose_problems(compose, dockerfile, config_override=parse_config(config)) != []


def _dockerfile_without(line_start: str, replacement: str = "") -> str:
    lines = DOCKERFILE.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(line_start)]
    assert hits, line_start
    lines[hits[-1]] = replacement
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [
    "FROM python:3.11-slim\nCOPY . .\nRUN pip install -r requirements.txt\nENTRYPOINT [\"gravity\"]\n",
    "FROM python:3.11-slim\nCOPY . .\nRUN pip install .\nCMD [\"python\", \"-m\", \"http.server\"]\n",
    _dockerfile_without("USER"),
    _dockerfile_without("USER", "USER root"),
    _dockerfile_without("STOPSIGNAL", "STOPSIGNAL SIGINT"),
    _dockerfile_without("COPY config/tiktoken"),
    _dockerfile_without("ARG BASE_IMAGE", "ARG BASE_IMAGE=python:3.12"),
    _dockerfile_without("FROM ${BASE_IMAGE}", "FROM debian:bookworm"),
    _dockerfile_without("HEALTHCHECK", "HEALTHCHECK NONE"),
], ids=["no pip install .", "does not run gravity", "no USER", "USER root", "STOPSIGNAL SIGINT",
        "tiktoken not copied", "other default base", "final stage not on the base", "no healthcheck"])
def test_bad_dockerfile_is_caught(compose: dict[str, Any], text: str) -> None:
    assert any(p.startswith("Dockerfile") for p in compose_problems(compose, text))
