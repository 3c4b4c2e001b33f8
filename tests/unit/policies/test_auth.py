from __future__ import annotations

from typing import Any

import pytest

from policies.auth import Authenticator, bearer_token
from policies.config import AuthConfig, KeyConfig
from policies.errors import InvalidApiKey, KeyStoreUnavailable, ModelNotAllowed
from policies.keys import ApiKey, hash_key


class FakeStore:
    """Stands in for RedisKeyStore (the KeyStore protocol): a dict, call counters, a switch to make
    it fail, and a version that `gravity keys` bumps on every change (`bump=False`: an older one)."""

    def __init__(self, keys: dict[str, ApiKey] | None = None) -> None:
        self.keys = keys or {}
        self.version = 0
        self.calls = 0
        self.index_calls = 0
        self.down = False

    def add(self, text: str, bump: bool = True) -> ApiKey:
        key = ApiKey(sha256=hash_key(text), name=text, tenant="t", source="redis")
        self.keys[key.sha256] = key
        self.version += bump
        return key

    async def get(self, sha256: str) -> ApiKey | None:
        self.calls += 1
        if self.down:
            raise ConnectionError("redis down")
        return self.keys.get(sha256)

    async def signature(self) -> tuple[int, int]:
        self.index_calls += 1
        if self.down:
            raise ConnectionError("redis down")
        return self.version, len(self.keys)

    async def hashes(self) -> frozenset[str]:
        self.index_calls += 1
        if self.down:
            raise ConnectionError("redis down")
        return frozenset(self.keys)


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
    store.add("new")
    with pytest.raises(InvalidApiKey):  # the miss is remembered for a second
        await auth.authenticate({"authorization": "Bearer new"})
    clock.t = 1.5
    assert (await auth.authenticate({"authorization": "Bearer new"})).name == "new"
    calls = store.calls
    clock.t = 5
    await auth.authenticate({"authorization": "Bearer new"})
    assert store.calls == calls
    # Redis down: a key seen before keeps working, an unknown one gets 503 rather than 401.
    store.down = True
    clock.t = 100
    assert (await auth.authenticate({"authorization": "Bearer new"})).name == "new"
    with pytest.raises(KeyStoreUnavailable):
        await auth.authenticate({"authorization": "Bearer other"})


async def test_a_flood_of_random_bad_keys_costs_no_lookup_and_evicts_nothing() -> None:
    store, clock = FakeStore(), Clock()
    store.add("good")
    auth = Authenticator(AuthConfig(enabled=True, cache_ttl_s=10), store, clock=clock)  # type: ignore[arg-type]
    assert (await auth.authenticate({"authorization": "Bearer good"})).name == "good"
    gets = store.calls
    for i in range(20_000):  # twice the cache's size
        with pytest.raises(InvalidApiKey):
            await auth.authenticate({"authorization": f"Bearer random-{i}"})
        clock.t += 0.0005  # 10 s of flood at 2,000 keys a second
    assert store.calls == gets, "a bad key cost a record lookup"
    assert store.index_calls <= 2 + 11, store.index_calls  # one index check a second at most
    assert (await auth.authenticate({"authorization": "Bearer good"})).name == "good"
    assert store.calls == gets + 1  # its cache entry expired (10 s) but was never evicted


async def test_a_new_key_works_within_a_second_even_from_an_older_gravity_keys() -> None:
    store, clock = FakeStore(), Clock()
    auth = Authenticator(AuthConfig(enabled=True), store, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(InvalidApiKey):
        await auth.authenticate({"authorization": "Bearer a"})
    store.add("a")
    clock.t = 1.1
    assert (await auth.authenticate({"authorization": "Bearer a"})).name == "a"
    # An older `gravity keys` changes the set without bumping the version: revoke one, create one.
    del store.keys[hash_key("a")]
    store.add("b", bump=False)
    clock.t = 62  # the index is reloaded in full at least once a minute
    assert (await auth.authenticate({"authorization": "Bearer b"})).name == "b"


async def test_store_down_unknown_keys_are_503_without_a_lookup_each() -> None:
    store, clock = FakeStore(), Clock()
    store.add("good")
    auth = Authenticator(AuthConfig(enabled=True, cache_ttl_s=1), store, clock=clock)  # type: ignore[arg-type]
    await auth.authenticate({"authorization": "Bearer good"})
    store.down = True
    clock.t = 5
    calls = store.calls + store.index_calls
    for i in range(100):
        with pytest.raises(KeyStoreUnavailable):
            await auth.authenticate({"authorization": f"Bearer random-{i}"})
    assert store.calls + store.index_calls <= calls + 2
    assert (await auth.authenticate({"authorization": "Bearer good"})).name == "good"  # seen before


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
