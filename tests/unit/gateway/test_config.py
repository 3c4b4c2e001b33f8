from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

BACKEND = {"name": "vllm-0", "url": "http://127.0.0.1:9001", "kind": "vllm", "models": ["m"]}


def test_defaults_match_the_documented_contract() -> None:
    cfg = parse_config({"backends": [BACKEND]})
    assert (cfg.server.host, cfg.server.port, cfg.server.debug_headers) == ("127.0.0.1", 8080, False)
    assert cfg.server.max_body_bytes == 8 * 1024 * 1024
    assert cfg.state.redis_url is None  # embedded Redis


@pytest.mark.parametrize(("kind", "prefix", "api_base"), [
    ("vllm", None, "http://h:1/v1"),
    ("kserve", None, "http://h:1/openai/v1"),
    ("openai", None, "http://h:1/v1"),
    ("kserve", "/custom/v1/", "http://h:1/custom/v1"),
    ("vllm", "", "http://h:1"),
])
def test_api_base_by_kind(kind: str, prefix: str | None, api_base: str) -> None:
    b = {"name": "b", "url": "http://h:1/", "kind": kind}
    if prefix is not None:
        b["path_prefix"] = prefix
    assert parse_config({"backends": [b]}).backends[0].api_base == api_base


@pytest.mark.parametrize(("data", "message"), [
    ({"backends": [BACKEND, {"name": "b", "url": "ftp://x"}]}, "backends[1].url: must be an http"),
    ({"backends": [{"name": "b", "url": "http://x", "kind": "triton"}]}, "backends[0].kind"),
    ({"server": {"port": "eighty"}}, "server.port"),
    ({"server": {"debug": True}}, "server.debug: Extra inputs are not permitted"),
    ({"backends": [BACKEND, BACKEND]}, "backends[1].name: duplicate backend name 'vllm-0'"),
    ({"server": {"upstream_client": "raw"}, "backends": [BACKEND, {"name": "t", "url": "https://x"}]},
     "backends[1].url: server.upstream_client raw speaks plain http:// only"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ([1, 2], "(root): the config must be a mapping"),
    ({"routing": {"profiles": [{"name": "d", "plugins": [{"ref": "nope"}]}]}},
     "\nrouting.profiles[0].plugins[0].ref: unknown plugin 'nope'"),
    ({"policies": {"auth": {"keys": [{"name": "k", "sha256": "0" * 64, "profiles": ["default", "rr"]}]}}},
     "policies.auth.keys[0].profiles[1]: unknown routing profile 'rr'"),
])
def test_errors_name_the_path(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in "\n" + str(info.value)


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_KEY", "s3cret")
    cfg = parse_config({"backends": [{**BACKEND, "api_key": "${VLLM_KEY}"}]})
    assert cfg.backends[0].api_key == "s3cret"
    with pytest.raises(ConfigError, match="MISSING_VAR"):
        parse_config({"backends": [{**BACKEND, "api_key": "${MISSING_VAR}"}]})
    assert parse_config({"backends": [{**BACKEND, "api_key": "${MISSING_VAR:-dflt}"}]}).backends[0].api_key == "dflt"


def test_load_config_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[3] / "config"
    # config/envoy*.yaml are Envoy's own bootstrap files (tests/e2e start Envoy with them).
    shipped = [p for p in root.glob("*.yaml") if not p.name.startswith("envoy")]
    assert shipped, "config/ should ship example configs"
    for path in shipped:
        load_config(path)


@pytest.mark.parametrize(("client", "urls", "resolved"), [
    ("auto", ["http://a:1", "http://b:1"], "raw"),
    ("auto", ["http://a:1", "https://b:1"], "aiohttp"),  # the raw client speaks no TLS
    ("aiohttp", ["http://a:1"], "aiohttp"),
    ("raw", ["http://a:1"], "raw"),
])
def test_the_upstream_client_auto_picks_raw_only_for_plain_http(client: str, urls: list[str], resolved: str) -> None:
    cfg = parse_config({"server": {"upstream_client": client},
                        "backends": [{"name": f"b{i}", "url": u} for i, u in enumerate(urls)]})
    assert cfg.upstream_client == resolved
