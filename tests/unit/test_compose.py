"""docker-compose.yml, config/compose.yaml and the Dockerfile agree with each other and with the demo.

No Docker engine is needed: the files are parsed and cross-checked. `compose_problems` returns every
disagreement it finds, so the mutation tests below prove each check can fail.
"""
from __future__ import annotations

import copy
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
CONFIG_IN_CONTAINER = "/etc/gravity/gravity.yaml"
SIM_COUNT = 3


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
    instructions = dockerfile_instructions(dockerfile)
    if not any(w == "RUN" and "pip install" in a and " ." in f" {a} " for w, a in instructions):
        problems.append("Dockerfile: no `RUN pip install .` of the project")
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

    # The gateway: `gravity serve --config /etc/gravity/gravity.yaml` with config/compose.yaml there.
    gateways = [n for n, s in services.items() if _gravity_subcommand(service_argv(s, dockerfile)) == "serve"]
    if len(gateways) != 1:
        problems.append(f"expected one `gravity serve` service, found {gateways}")
        return problems
    gw_name = gateways[0]
    gw = services[gw_name]
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
        if b.models is not None and sims[key] not in b.models:
            problems.append(f"backends[{i}].models {b.models}: {key[0]} serves {sims[key]!r}")
        if key[0] not in _depends_on(gw):
            problems.append(f"services.{gw_name}.depends_on lacks {key[0]}")
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
        if "redis" not in _depends_on(gw):
            problems.append(f"services.{gw_name}.depends_on lacks redis")

    # The published port reaches the port the gateway listens on, on all container interfaces.
    published = _published(gw.get("ports") or [])
    if cfg.server.port not in published:
        problems.append(f"services.{gw_name}.ports {gw.get('ports')}: server.port {cfg.server.port} "
                        "is not published")
    if cfg.server.host not in ("0.0.0.0", "::"):
        problems.append(f"server.host {cfg.server.host}: unreachable through the published port")
    return problems


def _depends_on(service: dict[str, Any]) -> set[str]:
    deps = service.get("depends_on") or []
    return set(deps) if isinstance(deps, (list, dict)) else set()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_compose_stack_agrees(compose: dict[str, Any], dockerfile: str) -> None:
    assert compose_problems(compose, dockerfile) == []


def test_compose_config_mirrors_the_demo(compose: dict[str, Any]) -> None:
    mounted = _mounted_config(compose["services"]["gateway"])
    assert mounted is not None
    ours, demo = load_config(mounted), load_config(REPO / "config" / "demo.yaml")
    assert [(b.name, b.kind, b.models, urlsplit(b.url).port) for b in ours.backends] == \
        [(b.name, b.kind, b.models, urlsplit(b.url).port) for b in demo.backends]
    assert ours.routing == demo.routing
    assert ours.server.port == demo.server.port


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
}


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


@pytest.mark.parametrize("text", [
    "FROM python:3.11-slim\nCOPY . .\nRUN pip install -r requirements.txt\nENTRYPOINT [\"gravity\"]\n",
    "FROM python:3.11-slim\nCOPY . .\nRUN pip install .\nCMD [\"python\", \"-m\", \"http.server\"]\n",
], ids=["no pip install .", "does not run gravity"])
def test_bad_dockerfile_is_caught(compose: dict[str, Any], text: str) -> None:
    assert any(p.startswith("Dockerfile") for p in compose_problems(compose, text))
