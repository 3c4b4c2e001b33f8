"""Cross-checks of docker-compose.yml, config/compose.yaml and the Dockerfile, without a Docker engine.

Each `*_problems` function returns every disagreement it finds (an empty list when the files agree),
so tests can prove each check fails on a mutated copy (tests/unit/test_compose.py).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.config import ConfigError, GatewayConfig, load_config

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


def argv_of(value: Any) -> list[str]:
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
    entrypoint = argv_of(service["entrypoint"]) if "entrypoint" in service else image_ep
    command = argv_of(service["command"]) if "command" in service else image_cmd
    return entrypoint + command


def flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def gravity_subcommand(argv: list[str]) -> str | None:
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


def mounted_config(service: dict[str, Any]) -> Path | None:
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
        if gravity_subcommand(argv) != "sim":
            continue
        if name not in built:
            problems.append(f"services.{name}: a simulator not built from the project Dockerfile")
        host, port, model = flag_value(argv, "--host"), flag_value(argv, "--port"), flag_value(argv, "--model")
        if host != "0.0.0.0":
            problems.append(f"services.{name}: simulator listens on {host!r}, unreachable from other containers")
        if port is None or not port.isdigit() or model is None:
            problems.append(f"services.{name}: simulator needs --port and --model, got {argv}")
            continue
        sims[(name, int(port))] = model
    if len(sims) != SIM_COUNT:
        problems.append(f"expected {SIM_COUNT} simulator services like `gravity demo`, found {len(sims)}")

    # The gateways: `gravity serve --config /etc/gravity/gravity.yaml` with config/compose.yaml there.
    gateways = [n for n, s in services.items() if gravity_subcommand(service_argv(s, dockerfile)) == "serve"]
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
    if flag_value(gw_argv, "--config") != CONFIG_IN_CONTAINER:
        problems.append(f"services.{gw_name}: serve --config is {flag_value(gw_argv, '--config')!r}, "
                        f"not {CONFIG_IN_CONTAINER}")
    mounted = mounted_config(gw)
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
        redis_port = int(flag_value(argv_of(redis.get("command")), "--port") or 6379)
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
    model = flag_value(argv, "--model")
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
    argv = argv_of(redis.get("command"))
    data_dir = flag_value(argv, "--dir")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in redis.get("volumes") or []}
    if flag_value(argv, "--appendonly") != "yes":
        problems.append("services.redis: persistence off (--appendonly yes)")
    if data_dir is None or mounts.get(data_dir) not in (compose.get("volumes") or {}):
        problems.append(f"services.redis: --dir {data_dir} is not a named volume ({mounts})")
    return problems


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """service -> condition (`service_started` for the short list form)."""
    deps = service.get("depends_on") or []
    if isinstance(deps, dict):
        return {k: str((v or {}).get("condition", "service_started")) for k, v in deps.items()}
    return {str(d): "service_started" for d in deps}


