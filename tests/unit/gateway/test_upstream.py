from __future__ import annotations

from gateway.config import parse_config
from gateway.upstream import (
    BackendTarget,
    TrustedProxies,
    forwardable_request_headers,
    forwardable_response_headers,
)


def test_client_credentials_and_hop_headers_stay_at_the_gateway() -> None:
    out = forwardable_request_headers([
        (b"authorization", b"Bearer client-key"), (b"x-api-key", b"k"), (b"host", b"gw"),
        (b"content-length", b"10"), (b"x-gravity-priority", b"critical"),
        (b"traceparent", b"00-abc-def-01"), (b"x-session-id", b"s1"),
    ])
    assert out == {"traceparent": "00-abc-def-01", "x-session-id": "s1", "accept-encoding": "identity"}


def test_headers_named_in_connection_are_hop_by_hop() -> None:
    out = forwardable_request_headers([(b"connection", b"close, X-Hop, Keep-Alive"), (b"x-hop", b"1"),
                                       (b"keep-alive", b"timeout=5"), (b"x-end-to-end", b"2")])
    assert out == {"x-end-to-end": "2", "accept-encoding": "identity"}


def test_client_cannot_assert_its_address_or_its_destination() -> None:
    out = forwardable_request_headers([
        (b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-proto", b"https"), (b"forwarded", b"for=6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"), (b"cookie", b"a=b"), (b"x-gateway-destination-endpoint", b"10.0.0.1:80"),
        (b"X-Gateway-Destination-Endpoint-Subset", b"10.0.0.1:80")], "192.0.2.7", "http")
    assert out == {"x-forwarded-for": "192.0.2.7", "x-forwarded-proto": "http", "accept-encoding": "identity"}


def test_a_trusted_proxy_extends_the_forwarded_chain() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    headers = [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-proto", b"https")]
    via_lb = forwardable_request_headers(headers, "10.1.2.3", "http", trusted)
    assert (via_lb["x-forwarded-for"], via_lb["x-forwarded-proto"]) == ("203.0.113.9, 10.1.2.3", "https")
    direct = forwardable_request_headers(headers, "198.51.100.1", "http", trusted)
    assert (direct["x-forwarded-for"], direct["x-forwarded-proto"]) == ("198.51.100.1", "http")


def test_backend_response_headers_lose_hop_headers_and_their_request_id() -> None:
    out = forwardable_response_headers({"Content-Type": "application/json", "Content-Length": "5",
                                        "X-Request-Id": "backend-id", "Server": "uvicorn",
                                        "Content-Encoding": "gzip", "Set-Cookie": "lb=1"})
    assert out == {"content-type": "application/json"}


def test_backend_credential_comes_from_config_only() -> None:
    cfg = parse_config({"backends": [{"name": "b", "url": "http://h:1", "kind": "kserve", "api_key": "up"}]})
    target = BackendTarget.from_config(cfg.backends[0])
    assert target.auth_header == "Bearer up"
    assert (target.api_base, target.models_url, target.metrics_url) == (
        "http://h:1/openai/v1", "http://h:1/openai/v1/models", "http://h:1/metrics")


def test_hosted_openai_backends_are_not_scraped_for_metrics() -> None:
    cfg = parse_config({"backends": [{"name": "o", "url": "https://api.example", "kind": "openai"},
                                     {"name": "v", "url": "http://h:1"}]})
    assert BackendTarget.from_config(cfg.backends[0]).metrics_url is None
    assert BackendTarget.from_config(cfg.backends[1]).metrics_url == "http://h:1/metrics"
