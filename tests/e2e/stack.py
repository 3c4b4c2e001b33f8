"""Real Envoy in front of simulators, with `gravity extproc` sidecars: start, render, stop.

`config/envoy*.yaml` are used as shipped; `render_envoy` changes only what a test must: ports,
the pool's endpoint list, the ext_proc replicas, and the two switches tests flip on purpose
(`failure_mode_allow`, the request body mode).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import REPO, Proc, free_port, start_redis, start_sim, write_config

MODEL = "sim-llama"


def envoy_binary() -> str:
    found = os.environ.get("GRAVITY_ENVOY") or str(REPO / ".venv-envoy" / "bin" / "envoy")
    if not Path(found).exists():
        raise RuntimeError(f"Envoy not found at {found}; `make envoy` installs it")
    return found


def _socket(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"address": {"socket_address": {"address": host, "port_value": port}}}


def render_envoy(template: str, *, listen: int, admin: int, extproc: list[int], pool: list[int],
                 failure_mode_allow: bool = False, request_body_mode: str | None = None,
                 subset: list[str] | str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load((REPO / "config" / template).read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    ext["failure_mode_allow"] = failure_mode_allow
    if request_body_mode is not None:
        ext["processing_mode"]["request_body_mode"] = request_body_mode
        if request_body_mode != "FULL_DUPLEX_STREAMED":
            ext["processing_mode"].pop("request_trailer_mode", None)
    if subset is not None:
        # What a data plane that narrows the pool would do: metadata set before ext_proc runs.
        at = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == "envoy.filters.http.ext_proc")
        hcm["http_filters"].insert(at, {"name": "envoy.filters.http.set_metadata", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                          "value": {"x-gateway-destination-endpoint-subset": subset}}]}})
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == "gravity_extproc":
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [{"endpoint": _socket(p)} for p in extproc]
        elif cluster["name"] == "inference_pool" and cluster["type"] == "STATIC":
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [{"endpoint": _socket(p)} for p in pool]
    return cfg


def start_envoy(tmp: Path, cfg: dict[str, Any]) -> Proc:
    path = write_config(tmp, cfg)
    listen = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    args = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
            "--concurrency", "2"]
    proc = Proc(args, listen, tmp / f"envoy-{listen}.log").start(timeout=30)
    return proc


def start_sidecar(tmp: Path, cfg: dict[str, Any], port: int | None = None) -> Proc:
    port = port or free_port()
    cfg = {**cfg, "extproc": {**cfg.get("extproc", {}), "host": "127.0.0.1", "port": port}}
    path = write_config(tmp, cfg)
    args = [sys.executable, "-m", "gateway", "extproc", "--config", str(path), "--log-level", "info"]
    proc = Proc(args, port, tmp / f"extproc-{port}.log").start(timeout=30)
    wait_serving(port, "readiness")
    return proc


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            raise


def wait_serving(port: int, service: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            if health(port, service) == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.1)
    raise TimeoutError(f"ext_proc on {port} not {service} within {timeout}s")


def sim_requests(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/requests", timeout=5) as r:
        return list(json.loads(r.read())["requests"])


@dataclass
class Stack:
    """Redis, simulators, sidecar replicas and one Envoy; `base` is the OpenAI base URL through Envoy."""

    tmp: Path
    redis: Proc
    sims: list[Proc]
    sidecars: list[Proc]
    envoy: Proc | None = None
    gravity: dict[str, Any] = field(default_factory=dict)
    mode: str = "FULL_DUPLEX_STREAMED"
    admin: int = 0
    """Envoy's admin port."""

    @property
    def base(self) -> str:
        assert self.envoy is not None
        return f"http://127.0.0.1:{self.envoy.port}/v1"

    def served_by(self, request_id: str) -> list[int]:
        """Which simulators (by index) logged a request with this x-request-id."""
        return [i for i, s in enumerate(self.sims) if s.popen.poll() is None  # skip killed ones
                and any(r["request_id"].endswith("-" + request_id) for r in sim_requests(s.port))]

    def stop(self) -> None:
        for p in (self.envoy, *self.sidecars, *self.sims, self.redis):
            if p is not None:
                p.stop()


def gravity_config(redis: Proc, sims: list[Proc], **sections: Any) -> dict[str, Any]:
    return {"server": {"debug_headers": True, **sections.pop("server", {})},
            "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
            "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                         for i, s in enumerate(sims)],
            **sections}


@contextlib.contextmanager
def stack(tmp: Path, *, sims: int = 2, sidecars: int = 1, template: str = "envoy.yaml",
          sim_args: list[str] | None = None, failure_mode_allow: bool = False,
          request_body_mode: str | None = None, subset: list[int] | str | None = None,
          **sections: Any) -> Iterator[Stack]:
    """`subset`: simulator indexes (a list, or a comma string of them) for the subset hint."""
    started: list[Proc] = []
    st: Stack | None = None
    try:
        redis = start_redis(tmp)
        started.append(redis)
        sim_procs = [start_sim(tmp, MODEL, sim_args if sim_args is not None else ["--profile", "tiny"])
                     for _ in range(sims)]
        started.extend(sim_procs)
        cfg = gravity_config(redis, sim_procs, **sections)
        side = [start_sidecar(tmp, cfg) for _ in range(sidecars)]
        started.extend(side)
        st = Stack(tmp, redis, sim_procs, side, gravity=cfg)
        st.admin = free_port()
        st.envoy = start_envoy(tmp, render_envoy(
            template, listen=free_port(), admin=st.admin, extproc=[p.port for p in side],
            pool=[s.port for s in sim_procs], failure_mode_allow=failure_mode_allow,
            request_body_mode=request_body_mode, subset=_subset(subset, sim_procs)))
        started.append(st.envoy)
        yield st
    finally:
        # Tests may replace a sidecar (a restart): stop whatever the stack holds now as well.
        for proc in [*(st.sidecars if st is not None else []), *reversed(started)]:
            proc.stop()


def _subset(subset: list[int] | str | None, sims: list[Proc]) -> list[str] | str | None:
    if subset is None:
        return None
    if isinstance(subset, str):  # indexes, or addresses given as they are
        return ",".join(i if ":" in i else f"127.0.0.1:{sims[int(i)].port}" for i in subset.split(",") if i)
    return [f"127.0.0.1:{sims[i].port}" for i in subset]


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """One POST, read whole (streams too), with plain http.client: nothing between test and Envoy."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, json.dumps(body).encode(),
                     {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
