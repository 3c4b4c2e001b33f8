"""docker-compose.yml, config/compose.yaml and the Dockerfile agree with each other and with the demo.

No Docker engine is needed: the files are parsed and cross-checked. `compose_problems` returns every
disagreement it finds, so the mutation tests below prove each check can fail.
"""
from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import load_config, parse_config
from tests.support.compose_checks import (
    COMPOSE,
    CONFIG_IN_CONTAINER,
    DOCKERFILE,
    OBS,
    REPO,
    compose_problems,
    flag_value,
    gravity_subcommand,
    image_entrypoint,
    interpolate,
    load_compose,
    mounted_config,
    stack_problems,
)
from tests.support.compose_observability import (
    collector_problems,
    dashboard_problems,
    metric_families,
    observability_problems,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_compose_stack_agrees(compose: dict[str, Any], dockerfile: str) -> None:
    assert compose_problems(compose, dockerfile) == []


def test_compose_config_mirrors_the_demo(compose: dict[str, Any]) -> None:
    mounted = mounted_config(compose["services"]["gateway"])
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
    assert gravity_subcommand(argv) == "serve" and flag_value(argv, "--config") == CONFIG_IN_CONTAINER


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
    assert dashboard_problems(dash, "gravity-prometheus", metric_families() | {"up"}) != []


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
