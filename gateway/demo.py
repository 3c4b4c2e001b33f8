"""`gravity demo`: simulated vLLM backends, an embedded Redis and the gateway, in one command.

What `make run` starts; the backends come from the config so the demo and docker-compose agree.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from gateway.config import GatewayConfig

REPO = Path(__file__).resolve().parents[1]

SNIPPET = """
Gravity is up: http://{host}:{port}/v1  (model: {model})

  from openai import OpenAI
  client = OpenAI(base_url="http://{host}:{port}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

  curl http://{host}:{port}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": true}}'

Backends: curl http://{host}:{port}/admin/backends   Metrics: curl http://{host}:{port}/metrics
Ctrl-C stops everything.
"""


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gravity demo: simulator on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"gravity demo: simulator on port {port} did not start")


def _override(cfg: GatewayConfig, base_port: int | None, state_dir: str | None) -> GatewayConfig:
    backends = [b.model_copy(update={"url": f"http://127.0.0.1:{base_port + i}"}) if base_port else b
                for i, b in enumerate(cfg.backends)]
    state = cfg.state.model_copy(update={"embedded_dir": state_dir}) if state_dir else cfg.state
    return cfg.model_copy(update={"backends": backends, "state": state})


def _write_temp(cfg: GatewayConfig) -> str:
    fd, path = tempfile.mkstemp(prefix="gravity-demo-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), f)
    return path


def _die_with_parent() -> None:
    """Run in the child before exec: on Linux, get SIGTERM when the demo process dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def build_parser() -> argparse.ArgumentParser:
    from simulator.profiles import DEFAULT_PROFILE

    parser = argparse.ArgumentParser(prog="gravity demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "demo.yaml"))
    parser.add_argument("--port", type=int, help="gateway port (default from the config)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="simulator profile")
    parser.add_argument("--time-scale", default="1", help="simulators run this many times real time")
    parser.add_argument("--sim-base-port", type=int,
                        help="run the simulators on this port and the next ones instead of the config's")
    parser.add_argument("--state-dir", help="where the embedded Redis keeps its data")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from gateway.config import load_config

    # uvicorn re-raises the SIGTERM it caught once it has shut down; turn it into SystemExit so
    # the finally below still stops the simulators.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cfg = load_config(args.config)
    if args.sim_base_port or args.state_dir:
        cfg = _override(cfg, args.sim_base_port, args.state_dir)
        args.config = _write_temp(cfg)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for b in cfg.backends:
            url = urlsplit(b.url)
            host, port = url.hostname or "127.0.0.1", url.port or 80
            cmd = [sys.executable, "-m", "simulator", "--host", host, "--port", str(port),
                   "--model", (b.models or ["sim-llama"])[0], "--profile", args.profile,
                   "--time-scale", args.time_scale]
            procs.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))  # noqa: PLW1509 - no threads yet
            _wait_port(host, port, procs[-1])
        from gateway.cli import main as gravity

        port = args.port or cfg.server.port
        model = next((m for b in cfg.backends for m in (b.models or ())), "sim-llama")
        print(SNIPPET.format(host=cfg.server.host, port=port, model=model), flush=True)
        serve = ["serve", "--config", args.config, "--log-level", "info"]
        if args.port:
            serve += ["--port", str(args.port)]
        return gravity(serve)
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
