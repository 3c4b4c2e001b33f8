"""Build docker-compose.yml's images offline and run the stack with podman and podman-compose.

The harness of tests/compose and of `make compose-up / compose-test / compose-down`; docs/compose.md
says why each step is the way it is. `python -m tests.compose.harness {check,build,up,down,leftovers}`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
PROMETHEUS_CONTAINERFILE = Path(__file__).with_name("prometheus.Containerfile")
WHEELS_DIR = REPO / ".wheels"  # inside the build context: the Dockerfile's GRAVITY_WHEELS points here

PROJECT = os.environ.get("GRAVITY_COMPOSE_PROJECT", "gravity-test")
PROFILE = "observability"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "redis-server")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
CORE_SERVICES = ("redis", "vllm-0", "vllm-1", "vllm-2", "gateway", "gateway-b")
# The one observability service the tests run: the others' images come only from a registry.
RUN_OBSERVABILITY = ("prometheus",)

_HEX = hashlib.sha256(f"{BASE_SUITE}|minbase|{','.join(sorted(BASE_PACKAGES))}".encode()).hexdigest()[:12]
BASE_IMAGE = f"localhost/gravity-base:{BASE_SUITE}-{_HEX}"
PROMETHEUS_IMAGE = f"localhost/gravity-prometheus:{BASE_SUITE}-{_HEX}"
GRAVITY_IMAGE = "localhost/gravity:compose-test"


class HarnessError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[compose] {msg}", file=sys.stderr, flush=True)


def podman_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every podman and podman-compose call: the test-owned containers.conf, the
    locally built images in place of the public ones, and any published-port overrides."""
    env = dict(os.environ)
    env.update({
        "CONTAINERS_CONF": str(CONTAINERS_CONF),
        "GRAVITY_BASE_IMAGE": BASE_IMAGE,
        "GRAVITY_WHEELS": WHEELS_DIR.name,
        "GRAVITY_IMAGE": GRAVITY_IMAGE,
        "REDIS_IMAGE": BASE_IMAGE,  # Debian's redis-server is in the base
        "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
    })
    env.update(extra or {})
    return env


def run(args: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True,
        capture: bool = True, stdin: bytes | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), env=dict(env) if env is not None else podman_env(), cwd=REPO,
                          input=stdin.decode() if stdin is not None else None, text=True,
                          capture_output=capture, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout or ''}{proc.stderr or ''}")
    return proc


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], check=check, timeout=timeout)


def compose_cmd(*args: str, profiles: Iterable[str] = (PROFILE,)) -> list[str]:
    exe = shutil.which("podman-compose") or str(Path(sys.executable).with_name("podman-compose"))
    prof = [a for p in profiles for a in ("--profile", p)]
    return [exe, "--in-pod", "false", "-p", PROJECT, "-f", str(COMPOSE_FILE), *prof, *args]


def compose(*args: str, env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run(compose_cmd(*args), env=env or podman_env(), check=check, timeout=timeout)


# --- can a container run here at all? --------------------------------------------------------------

def container_check() -> str | None:
    """None when podman, runc and podman-compose work; otherwise the reason they do not."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path(compose_cmd()[0]).exists():
        return "podman-compose is not installed in this venv"
    if os.geteuid() != 0:
        return "debootstrap and rootful podman need root"
    # The check runs the image the stack is built on, so a pass means the stack's first step works.
    try:
        ensure_base()
        out = podman("run", "--rm", "--network", "none", BASE_IMAGE, "python3", "-c", "print('ok')",
                     check=False, timeout=120)
    except (HarnessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"could not make or run the base image: {exc}"
    if out.returncode != 0 or out.stdout.strip() != "ok":
        return f"podman run failed ({out.returncode}): {out.stderr.strip()[-500:]}"
    return None


# --- base image: debootstrap, imported, cached by its package list --------------------------------

def apt_mirror() -> str:
    """The Debian mirror the machine's apt sources name for BASE_SUITE (deb822 or one-line)."""
    texts: list[str] = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and BASE_SUITE in suites.group(1).split():
                return uris.group(1).rstrip("/")
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()  # drop `[signed-by=...]` options
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == BASE_SUITE:
                return parts[1].rstrip("/")
    return FALLBACK_MIRROR


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def ensure_base() -> str:
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    mirror = apt_mirror()
    started = time.monotonic()
    log(f"making {BASE_IMAGE} with debootstrap from {mirror} (cached afterwards)")
    with tempfile.TemporaryDirectory(prefix="gravity-base-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(root), mirror], timeout=1200)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=podman_env(),
                             capture_output=True, text=True, check=False)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise HarnessError(f"podman import failed: {imp.stderr}")
    log(f"base image ready in {time.monotonic() - started:.0f} s")
    return BASE_IMAGE


# --- wheels: built and fetched on the host, for the base image's own Python ------------------------

def base_python_version() -> str:
    out = podman("run", "--rm", "--network", "none", BASE_IMAGE, "python3", "-c",
                 "import platform; print(platform.python_version())")
    return out.stdout.strip()


def _offline_resolve(wheels: Path) -> str | None:
    """The first requirement the base's pip cannot satisfy from `wheels` alone, or None."""
    script = ("python3 -m venv /tmp/v && /tmp/v/bin/pip install -q --disable-pip-version-check "
              "--dry-run --no-index --find-links /wheels gravity-gateway")
    out = podman("run", "--rm", "--network", "none", "-v", f"{wheels}:/wheels:ro", BASE_IMAGE,
                 "sh", "-c", script, check=False)
    if out.returncode == 0:
        return None
    m = re.search(r"No matching distribution found for (.+)", out.stderr)
    if m is None:
        raise HarnessError(f"offline resolution in the base image failed:\n{out.stderr}")
    return m.group(1).split(";")[0].strip()


def build_wheels() -> Path:
    """Every wheel the image needs, in WHEELS_DIR, so `docker build` installs with --no-index.

    pip's --python-version picks wheels for the base's Python but evaluates environment markers on
    the full version (`python_full_version < "3.11.3"`) for the host's interpreter, so the base's own
    pip resolves once more offline and whatever it lacks is fetched here.
    """
    started = time.monotonic()
    version = base_python_version()
    WHEELS_DIR.mkdir(exist_ok=True)
    for old in WHEELS_DIR.glob("gravity_gateway-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    host = podman_env()
    run([*pip, "wheel", "--no-deps", "--wheel-dir", str(WHEELS_DIR), str(REPO)], env=host)
    project = next(WHEELS_DIR.glob("gravity_gateway-*.whl"))
    download = [*pip, "download", "--only-binary=:all:", "--python-version", version, "--dest", str(WHEELS_DIR)]
    run([*download, str(project)], env=host)
    for _ in range(20):
        missing = _offline_resolve(WHEELS_DIR)
        if missing is None:
            log(f"wheels for Python {version} ready in {time.monotonic() - started:.0f} s")
            return WHEELS_DIR
        log(f"the base's pip also needs {missing!r}: fetching it")
        run([*download, missing], env=host)
    raise HarnessError("wheel set did not converge after 20 rounds")


# --- images -----------------------------------------------------------------------------------------

def build_images() -> None:
    started = time.monotonic()
    # Through the compose file's own build section (one service: they all share the image).
    compose("build", "gateway")
    log(f"{GRAVITY_IMAGE} built in {time.monotonic() - started:.0f} s")
    # Each source change leaves the previous builder stage and image untagged: ~400 MB a run.
    podman("image", "prune", "-f", check=False)
    if not image_exists(PROMETHEUS_IMAGE):
        started = time.monotonic()
        podman("build", "-q", "-f", str(PROMETHEUS_CONTAINERFILE), "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "-t", PROMETHEUS_IMAGE, str(PROMETHEUS_CONTAINERFILE.parent), timeout=900)
        log(f"{PROMETHEUS_IMAGE} built in {time.monotonic() - started:.0f} s")


def build_all() -> None:
    ensure_base()
    build_wheels()
    build_images()


# --- the stack ----------------------------------------------------------------------------------------

def compose_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as podman-compose resolves it (variables interpolated, anchors merged)."""
    out = compose("config", env=env)
    data = yaml.safe_load(out.stdout)
    assert isinstance(data, dict)
    return data


def start_order(services: Mapping[str, Any], wanted: Iterable[str]) -> list[list[str]]:
    """`wanted` in waves: each service after everything it depends_on."""
    wanted = list(wanted)
    deps = {name: set(services[name].get("depends_on") or []) & set(wanted) for name in wanted}
    waves: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(wanted):
        wave = [n for n in wanted if n not in done and deps[n] <= done]
        if not wave:
            raise HarnessError(f"depends_on cycle among {sorted(set(wanted) - done)}")
        waves.append(wave)
        done |= set(wave)
    return waves


def container(service: str) -> str:
    out = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                 "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
    names = out.stdout.split()
    if len(names) != 1:
        raise HarnessError(f"expected one container for service {service}, found {names}")
    return names[0]


def state(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()


def health(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()


def has_healthcheck(name: str) -> bool:
    out = podman("inspect", "--format", "{{json .Config.Healthcheck}}", name).stdout.strip()
    return out not in ("", "null", "{}")


def wait_healthy(service: str, timeout: float = 120) -> float:
    """Run the service's healthcheck until it passes; the seconds it took.

    podman runs healthchecks from systemd timers, and this sandbox has no systemd: without this
    loop a container would stay `starting` for ever and `depends_on: service_healthy` could not
    be honoured (podman-compose 1.x also ignores the condition on podman 4.3). The check that runs
    is the container's own, as Docker would run it.
    """
    name = container(service)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        st = state(name)
        if st not in ("running", "created", "configured", "initialized"):
            raise HarnessError(f"{service} is {st}:\n{logs(service)}")
        if st == "running":
            if not has_healthcheck(name):
                return time.monotonic() - started
            if podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            raise HarnessError(f"{service} not healthy within {timeout:.0f} s:\n{logs(service)}")
        time.sleep(1)


def logs(service: str, tail: int = 60) -> str:
    with contextlib.suppress(HarnessError):
        name = container(service)
        out = podman("logs", "--tail", str(tail), name, check=False)
        return out.stdout + out.stderr
    return "(no container)"


def up(env: Mapping[str, str] | None = None,
       services: Sequence[str] = CORE_SERVICES + RUN_OBSERVABILITY) -> dict[str, float]:
    """Start `services` wave by wave as depends_on says, each wave healthy before the next; the
    seconds from the start of `up` until each service was healthy."""
    env = env or podman_env()
    started = time.monotonic()
    cfg = compose_config(env)["services"]
    ready: dict[str, float] = {}
    for wave in start_order(cfg, services):
        compose("up", "-d", "--no-build", "--no-deps", *wave, env=env, timeout=300)
        for service in wave:
            wait_healthy(service)
            ready[service] = time.monotonic() - started
    log("healthy after " + ", ".join(f"{s} {t:.1f} s" for s, t in ready.items()))
    return ready


def leftovers() -> dict[str, list[str]]:
    """Containers, pods, networks and volumes of the project that still exist."""
    label = f"label=io.podman.compose.project={PROJECT}"
    found = {
        "containers": podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split(),
        "pods": podman("pod", "ps", "--filter", label, "--format", "{{.Name}}").stdout.split(),
        "networks": [n for n in podman("network", "ls", "--format", "{{.Name}}").stdout.split()
                     if n.startswith(f"{PROJECT}_")],
        "volumes": [v for v in podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
                    if v.startswith(f"{PROJECT}_")],
    }
    return {k: v for k, v in found.items() if v}


def down(env: Mapping[str, str] | None = None) -> None:
    started = time.monotonic()
    compose("down", "-v", "--timeout", "45", env=env or podman_env(), timeout=600)
    left = leftovers()
    if left:
        raise HarnessError(f"compose down -v left {json.dumps(left)}")
    log(f"down in {time.monotonic() - started:.0f} s, nothing left")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.compose.harness", description=__doc__)
    p.add_argument("command", choices=["check", "build", "up", "down", "leftovers"])
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            reason = container_check()
            if reason:
                print(reason)
                return 1
            print("containers run here")
        elif args.command == "build":
            build_all()
        elif args.command == "up":
            up()
        elif args.command == "down":
            down()
        else:
            print(json.dumps(leftovers()))
    except HarnessError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
