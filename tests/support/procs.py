"""Start real processes (gateway, simulator, redis-server) on free loopback ports and stop them."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def _die_with_parent(args: list[str]) -> list[str]:
    """`args` run under util-linux's `setpriv --pdeathsig TERM`: Linux SIGTERMs the child when the test
    process dies.

    A pytest killed by a timeout or a signal runs no fixture teardown; without this its gateways,
    simulators and redis-servers lived on (seen: a dozen, for an hour, on a shared machine). The
    signal follows the *thread* that started the child, so a child started off the main thread (or
    where setpriv is missing) is started as before rather than dying when that thread ends."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return args
    return [setpriv, "--pdeathsig", "TERM", "--", *args]


@dataclass
class Proc:
    """A child process with its log file; `stop()` is idempotent."""

    args: list[str]
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes] = field(init=False)

    def start(self, env: dict[str, str] | None = None, timeout: float = 20.0) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(_die_with_parent(self.args), stdout=log, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=REPO)
        log.close()
        try:
            wait_for_port(self.port, timeout, self.popen)
        except Exception:  # noqa: BLE001 - any start failure: stop it and show its log
            self.stop()
            raise RuntimeError(f"{self.args!r} failed to start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server not found; `make test` installs it with apt-get")
    return found


def start_redis(tmp: Path, port: int | None = None, extra: list[str] | None = None) -> Proc:
    port = port or free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp), *(extra or [])]
    return Proc(args, port, tmp / f"redis-{port}.log").start()


def start_sim(tmp: Path, model: str = "sim-llama", extra: list[str] | None = None,
              port: int | None = None, timeout: float = 20.0) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "gateway", "sim", "--host", "127.0.0.1", "--port", str(port),
            "--model", model, *(extra or [])]
    return Proc(args, port, tmp / f"sim-{port}.log").start(timeout=timeout)


def write_config(tmp: Path, cfg: dict[str, object]) -> Path:
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=tmp)[1])
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_gateway(tmp: Path, cfg: dict[str, object], port: int | None = None,
                  env: dict[str, str] | None = None, timeout: float = 20.0) -> Proc:
    port = port or free_port()
    server = dict(cfg.get("server", {}))  # type: ignore[call-overload]
    server.update(host="127.0.0.1", port=port)
    # GRAVITY_TEST_STACK=uvicorn runs the gateway on uvicorn + aiohttp instead of its own server and
    # client (a test's own choice wins): how the integration suite runs on both stacks (conftest.py).
    if os.environ.get("GRAVITY_TEST_STACK") == "uvicorn":
        server.setdefault("engine", "uvicorn")
        server.setdefault("upstream_client", "aiohttp")
    cfg = {**cfg, "server": server}
    path = write_config(tmp, cfg)
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    return Proc(args, port, tmp / f"gateway-{port}.log").start(env=env, timeout=timeout)


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@dataclass
class Fleet:
    """A gateway in front of simulated backends, with a redis-server of its own."""

    gateway: Proc
    sims: list[Proc]
    redis: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"


@contextlib.contextmanager
def sim_fleet(tmp: Path, *, sims: int = 2, model: str = "sim-llama", sim_args: list[str] | None = None,
              server: dict[str, object] | None = None, state: dict[str, object] | None = None,
              ) -> Iterator[Fleet]:
    """Start redis-server, `sims` simulators named sim-0.. and a gateway routing to them; stop all."""
    started: list[Proc] = []
    try:
        redis = start_redis(tmp)
        started.append(redis)
        backends = []
        for i in range(sims):
            sim = start_sim(tmp, model, sim_args if sim_args is not None else ["--profile", "tiny"])
            started.append(sim)
            backends.append({"name": f"sim-{i}", "url": f"http://127.0.0.1:{sim.port}", "models": [model]})
        cfg = {"server": server or {}, "backends": backends,
               "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0", **(state or {})}}
        gateway = start_gateway(tmp, cfg)
        started.append(gateway)
        yield Fleet(gateway, started[1:-1], redis)
    finally:
        for proc in reversed(started):
            proc.stop()
