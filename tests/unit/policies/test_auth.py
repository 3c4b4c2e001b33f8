from __future__ import annotations

from typing import Any

import pytest

from policies.auth import Authenticator, bearer_token
from policies.config import AuthConfig, KeyConfig
from policies.errors import InvalidApiKey, KeyStoreUnavailable, ModelNotAllowed
from policies.keys import ApiKey, hash_key


class FakeStore:
    """Stands in for RedisKeyStore: a dict, a call counter and a switch to make it fail."""

    def __init__(self, keys: dict[str, ApiKey] | None = None) -> None:
        self.keys = keys or {}
        self.calls = 0
        self.down = False

    async def get(self, sha256: str) -> ApiKey | None:
        self.calls += 1
        if self.down:
            raise ConnectionError("redis down")
        return self.keys.get(sha256)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("headers", "token"), [
    ({"authorization": "Bearer abc"}, "abc"),
    ({"authorization": "bearer  abc "}, "abc"),
    ({"authorization": "Basic abc"}, None),
    ({"api-key": "abc"}, "abc"),
    ({"x-api-key": "abc"}, "abc"),
    ({}, None),
])
def test_bearer_token(headers: dict[str, str], token: str | None) -> None:
    assert bearer_token(headers) == token


async def test_auth_off_is_one_default_tenant() -> None:
    auth = Authenticator(AuthConfig(default_tenant="dev"))
    key = await auth.authenticate({})
    assert key.tenant == "dev" and key.sha256 == ""


async def test_config_keys_match_by_hash() -> None:
    cfg = AuthConfig(enabled=True, keys=[KeyConfig(name="a", sha256=hash_key("secret"), tenant="t")])
    auth = Authenticator(cfg)
    assert (await auth.authenticate({"authorization": "Bearer secret"})).tenant == "t"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(InvalidApiKey):
            await auth.authenticate(headers)


async def test_redis_keys_are_cached_and_misses_briefly() -> None:
    store, clock = FakeStore(), Clock()
    cfg = AuthConfig(enabled=True, cache_ttl_s=10)
    auth = Authenticator(cfg, store, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(InvalidApiKey):
        await auth.authenticate({"authorization": "Bearer new"})
    store.keys[hash_key("new")] = ApiKey(sha256=hash_key("new"), name="n", tenant="t", source="redis")
    with pytest.raises(InvalidApiKey):  # the miss is remembered for a second
        await auth.authenticate({"authorization": "Bearer new"})
    clock.t = 1.5
    assert (await auth.authenticate({"authorization": "Bearer new"})).name == "n"
    calls = store.calls
    clock.t = 5
    await auth.authenticate({"authorization": "Bearer new"})
    assert store.calls == calls
    # Redis down: a key seen before keeps working, an unknown one gets 503 rather than 401.
    store.down = True
    clock.t = 100
    assert (await auth.authenticate({"authorization": "Bearer new"})).name == "n"
    with pytest.raises(KeyStoreUnavailable):
        await auth.authenticate({"authorization": "Bearer other"})


async def test_model_allow_list_is_403_or_hidden_404() -> None:
    key = ApiKey(sha256="0" * 64, name="a", tenant="t", models=frozenset({"m"}))
    Authenticator(AuthConfig()).check_model(key, "m")
    with pytest.raises(ModelNotAllowed) as err:
        Authenticator(AuthConfig()).check_model(key, "x")
    assert err.value.http_status == 403
    with pytest.raises(ModelNotAllowed) as err:
        Authenticator(AuthConfig(hide_forbidden_models=True)).check_model(key, "x")
    assert err.value.http_status == 404


def test_redis_keys_can_be_switched_off() -> None:
    store: Any = FakeStore()
    assert Authenticator(AuthConfig(enabled=True, redis_keys=False), store).store is None
