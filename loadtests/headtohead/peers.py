"""The systems under test: Gravity from this checkout, and the peers from their PyPI packages, each
installed by the harness into a venv of its own (pinned, checked) and started with documented flags.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import venv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENVS = REPO / ".gravity" / "headtohead"

# Pinned releases. litellm: 1.82.7 and 1.82.8 were published to PyPI on 2026-03-24 with stolen
# credentials and steal secrets at start-up (1.82.8 through a litellm_init.pth that runs in every
# interpreter); the index here also lacks every 1.107.x. 1.81.16 is the last 1.81 release, from
# before the March compromise began, published through the project's normal release process.
PINS: dict[str, list[str]] = {
    "vllm-router": ["vllm-router==0.1.17"],
    "smg": ["smg==1.13.0"],
    "litellm": ["litellm[proxy]==1.81.16"],
}
COMPROMISED_LITELLM = {"1.82.7", "1.82.8"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _installed_version(py: Path, dist: str) -> str:
    out = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _check_litellm(env: Path, version: str) -> None:
    if version in COMPROMISED_LITELLM or version.startswith("1.107."):
        raise SystemExit(f"refusing to run litellm {version}: a compromised release")
    site = next(env.glob("lib/python*/site-packages"))
    unexpected = sorted(p.name for p in site.glob("*.pth") if p.name != "distutils-precedence.pth")
    if unexpected:
        raise SystemExit(f"unexpected .pth start-up hooks in {site}: {unexpected} (litellm_init.pth is the "
                         "March 2026 payload); delete the venv and look before running anything from it")


def ensure_venv(peer: str, log: Callable[[str], None] = print) -> Path:
    """The peer's venv under .gravity/headtohead/<peer>, created and installed on first use."""
    env = VENVS / peer
    stamp = env / ".pins.json"
    want = PINS[peer]
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        log(f"installing {' '.join(want)} into {env.relative_to(REPO)} (first run only)")
        venv.create(env, with_pip=True, clear=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary", ":all:", *want]
        subprocess.run(pip, check=True)
        stamp.write_text(json.dumps(want))
    dist = want[0].split("[")[0].split("==")[0]
    version = _installed_version(env / "bin" / "python", dist)
    if version != want[0].split("==")[1]:
        raise SystemExit(f"{peer}: installed {dist} {version}, pinned {want[0]}")
    if peer == "litellm":
        _check_litellm(env, version)
    return env


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Config files the system reads: name -> content, written into the run's temp dir."""
    metrics_port: int | None = None
    """Where the peer serves its own Prometheus metrics (its routing decisions), if it does."""
    cwd: Path | None = None
    """Where it starts (Gravity's baseline: another checkout); None: this checkout."""


@dataclass(frozen=True)
class System:
    name: str
    label: str
    peer: str | None
    """The PyPI package whose venv runs it; None for Gravity (this checkout's interpreter)."""
    build: Callable[[Path, int, list[str], str], Launch]
    """(run dir, port, worker base URLs, model) -> how to start it."""


def _gravity(tmp: Path, port: int, workers: list[str], model: str) -> Launch:
    backends = "".join(f'  - {{name: w{i}, url: "{u}", kind: vllm, models: [{model}]}}\n'
                       for i, u in enumerate(workers))
    cfg = (f"server: {{host: 127.0.0.1, port: {port}, read_timeout_s: 600}}\n"
           f"state: {{embedded_dir: {json.dumps(str(tmp / f'redis-{port}'))}}}\n"
           f"backends:\n{backends}")
    path = tmp / f"gravity-{port}.yaml"
    return Launch([sys.executable, "-m", "gateway", "serve", "--config", str(path)], files={str(path): cfg})


def _gravity_base(tmp: Path, port: int, workers: list[str], model: str) -> Launch:
    """Gravity from the checkout in $GRAVITY_BASE (e.g. `git worktree add /tmp/base main`), same config: a
    before/after of this checkout in the same run."""
    source = os.environ.get("GRAVITY_BASE")
    if not source:
        raise SystemExit("gravity-base needs GRAVITY_BASE=<checkout dir>")
    spec = _gravity(tmp, port, workers, model)
    spec.cwd = Path(source).resolve()
    return spec


def _vllm_router(policy: str) -> Callable[[Path, int, list[str], str], Launch]:
    def build(tmp: Path, port: int, workers: list[str], model: str) -> Launch:
        # Defaults otherwise (cache_aware: cache-threshold 0.3, balance thresholds, 2^25-char trees);
        # warning-level logs so logging is not what is measured.
        metrics = free_port()
        return Launch([str(VENVS / "vllm-router" / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port",
                       str(port), "--worker-urls", *workers, "--policy", policy, "--log-level", "warning",
                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics)], metrics_port=metrics)
    return build


def _smg(policy: str) -> Callable[[Path, int, list[str], str], Launch]:
    def build(tmp: Path, port: int, workers: list[str], model: str) -> Launch:
        metrics = free_port()
        return Launch([str(VENVS / "smg" / "bin" / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port),
                       "--worker-urls", *workers, "--policy", policy, "--log-level", "warn",
                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics)], metrics_port=metrics)
    return build


def _litellm(tmp: Path, port: int, workers: list[str], model: str) -> Launch:
    deployments = "".join(
        f"  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n"
        f"      api_base: {u}/v1\n      api_key: unused\n" for u in workers)
    cfg = (f"model_list:\n{deployments}"
           "router_settings:\n  routing_strategy: simple-shuffle\n"
           "litellm_settings:\n  drop_params: false\n  telemetry: false\n")
    path = tmp / f"litellm-{port}.yaml"
    # uvicorn's access log off, as every other system here runs without one.
    logs = tmp / f"litellm-{port}-logging.json"
    logging = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"},
               "loggers": {"uvicorn.access": {"level": "WARNING", "propagate": False, "handlers": []}}}
    # LITELLM_LOCAL_MODEL_COST_MAP: read the bundled cost map instead of fetching it at start-up.
    return Launch([str(VENVS / "litellm" / "bin" / "litellm"), "--config", str(path), "--host", "127.0.0.1",
                   "--port", str(port), "--num_workers", "1", "--log_config", str(logs)],
                  env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                       "LITELLM_TELEMETRY": "False"},
                  files={str(path): cfg, str(logs): json.dumps(logging)})


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("gravity", "Gravity (default profile)", None, _gravity),
    System("gravity-base", "Gravity at $GRAVITY_BASE (same config)", None, _gravity_base),
    System("vllm-router-ca", "vllm-router cache_aware", "vllm-router", _vllm_router("cache_aware")),
    System("vllm-router-rr", "vllm-router round_robin", "vllm-router", _vllm_router("round_robin")),
    System("smg-ca", "SMG cache_aware", "smg", _smg("cache_aware")),
    System("litellm", "LiteLLM simple-shuffle", "litellm", _litellm),
)}


def launch(system: System, tmp: Path, port: int, workers: list[str], model: str) -> Launch:
    spec = system.build(tmp, port, workers, model)
    for path, content in spec.files.items():
        Path(path).write_text(content)
    spec.env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(REPO / "config" / "tiktoken"), **spec.env}
    return spec
