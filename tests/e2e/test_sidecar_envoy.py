"""The `gravity extproc` process itself: flags over the `extproc:` section, TLS with
`--tls-cert/--tls-key` (a real gRPC client and a real Envoy speaking TLS to it), and the gRPC health
names the endpoint-picker protocol requires, `readiness` only once the first scrape is done."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.stack import MODEL, gravity_config, post, render_envoy, start_envoy
from tests.support.procs import Proc, free_port, start_redis, start_sim, write_config

NAME = "gravity-extproc"
SERVING = health_pb2.HealthCheckResponse.SERVING


def _certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "extproc.crt", tmp / "extproc.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={NAME}", "-addext",
                    f"subjectAltName=DNS:{NAME},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def _check(channel: grpc.Channel, service: str) -> int:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        raise
    return int(reply.status)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_tls_flags_and_health_through_a_real_envoy(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    redis = start_redis(tmp_path)
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    procs: list[Proc] = [redis, sim]
    try:
        section_port, port = free_port(), free_port()
        cfg = gravity_config(redis, [sim], routing={"scrape_timeout_s": 4.0},
                             extproc={"host": "127.0.0.2", "port": section_port})
        # A backend that does not answer its first scrape: the sidecar must not say it is ready.
        sim.popen.send_signal(signal.SIGSTOP)
        args = [sys.executable, "-m", "gateway", "extproc", "--config", str(write_config(tmp_path, cfg)),
                "--host", "127.0.0.1", "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
        sidecar = Proc(args, port, tmp_path / "extproc-tls.log").start(timeout=30)
        procs.append(sidecar)
        assert _refused(section_port)  # the flags won over the extproc: section
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", NAME)]) as tls:
            assert _check(tls, "liveness") == SERVING
            for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert _check(tls, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            sim.popen.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 20
            while _check(tls, "readiness") != SERVING:
                assert time.monotonic() < deadline, sidecar.log()
                time.sleep(0.1)
            assert _check(tls, "envoy.service.ext_proc.v3.ExternalProcessor") == SERVING
            assert _check(tls, "no.such.Service") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
            _check(plain, "liveness")  # TLS only: a plaintext client gets nowhere

        envoy_cfg = render_envoy("envoy.yaml", listen=free_port(), admin=free_port(), extproc=[port],
                                 pool=[sim.port])
        cluster = next(c for c in envoy_cfg["static_resources"]["clusters"] if c["name"] == "gravity_extproc")
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": NAME,
            "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {
                "trusted_ca": {"filename": str(cert)},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": NAME}}]}}}}
        envoy = start_envoy(tmp_path, envoy_cfg)
        procs.append(envoy)
        base = f"http://127.0.0.1:{envoy.port}/v1"
        deadline = time.monotonic() + 20
        while (r := post(base + "/completions", {"model": MODEL, "prompt": "over tls", "max_tokens": 2},
                         {"x-request-id": "tls-1"})).status_code != 200:
            assert time.monotonic() < deadline, r.text  # Envoy's first health check of the sidecar
            time.sleep(0.2)
        assert r.headers["x-gravity-backend"] == "sim-0" and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        if sim.popen.poll() is None:
            sim.popen.send_signal(signal.SIGCONT)
        for proc in reversed(procs):
            proc.stop()
