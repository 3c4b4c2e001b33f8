from __future__ import annotations

from gateway.config import parse_config
from gateway.upstream import BackendTarget, forwardable_request_headers, forwardable_response_headers


def test_client_credentials_and_hop_headers_stay_at_the_gateway() -> None:
    out = forwardable_request_headers([
        (b"authorization", b"Bearer client-key"), (b"x-api-key", b"k"), (b"host", b"gw"),
        (b"content-length", b"10"), (b"x-gravity-priority", b"critical"),
        (b"traceparent", b"00-abc-def-01"), (b"x-session-id", b"s1"),
    ])
    assert out == {"traceparent": "00-abc-def-01", "x-session-id": "s1"}


def test_backend_response_headers_lose_hop_headers_and_their_request_id() -> None:
    out = forwardable_response_headers({"Content-Type": "application/json", "Content-Length": "5",
                                        "X-Request-Id": "backend-id", "Server": "uvicorn"})
    assert out == {"content-type": "application/json"}


def test_backend_credential_comes_from_config_only() -> None:
    cfg = parse_config({"backends": [{"name": "b", "url": "http://h:1", "kind": "kserve", "api_key": "up"}]})
    target = BackendTarget.from_config(cfg.backends[0])
    assert target.auth_header == "Bearer up"
    assert (target.api_base, target.models_url, target.metrics_url) == (
        "http://h:1/openai/v1", "http://h:1/openai/v1/models", "http://h:1/metrics")
