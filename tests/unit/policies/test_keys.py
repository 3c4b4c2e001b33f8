from __future__ import annotations

import hashlib

from policies.config import KeyConfig, Limits
from policies.keys import KEY_PREFIX, ApiKey, generate_key, hash_key


def test_keys_are_random_prefixed_and_hashed_with_sha256() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith(KEY_PREFIX) and len(a) > 40
    assert hash_key(a) == hashlib.sha256(a.encode()).hexdigest()


def test_record_round_trip_keeps_everything_but_the_key() -> None:
    key = ApiKey(sha256=hash_key("k"), name="ci", tenant="t", models=frozenset({"m"}), priority="sheddable",
                 limits=Limits(tpm=5), created_at=1.0)
    raw = key.to_record()
    assert b"\"k\"" not in raw
    back = ApiKey.from_record(key.sha256, raw)
    assert back == ApiKey(**{**key.__dict__, "source": "redis"})
    assert back.id == key.sha256[:12]


def test_max_priority_defaults_to_the_keys_own_and_survives_the_record() -> None:
    plain = ApiKey(sha256=hash_key("k"), name="a", tenant="t", priority="sheddable")
    assert plain.priority_cap == "sheddable"
    boss = ApiKey(sha256=hash_key("k"), name="a", tenant="t", max_priority="critical")
    assert boss.priority_cap == "critical"
    assert ApiKey.from_record(boss.sha256, boss.to_record()).priority_cap == "critical"
    # A record written before max_priority existed caps at the key's own priority.
    assert ApiKey.from_record(boss.sha256, b'{"name": "a", "tenant": "t", "priority": "standard"}').priority_cap \
        == "standard"
    cfg = KeyConfig(name="a", sha256="0" * 64, priority="sheddable", max_priority="critical")
    assert ApiKey.from_config(cfg).priority_cap == "critical"


def test_only_listed_profiles_may_be_chosen_and_the_list_survives_the_record() -> None:
    key = ApiKey.from_config(KeyConfig(name="a", sha256="0" * 64, profiles=["round-robin"]))
    assert key.may_choose_profile("round-robin") and not key.may_choose_profile("default")
    assert ApiKey.from_record(key.sha256, key.to_record()).profiles == {"round-robin"}
    plain = ApiKey.from_config(KeyConfig(name="a", sha256="0" * 64))
    assert not plain.may_choose_profile("default")
    # With auth off every request is the anonymous key: trusted like its uncapped priority.
    assert ApiKey(sha256="", name="anonymous", tenant="t", source="anonymous").may_choose_profile("x")


def test_config_key_may_use_only_its_models() -> None:
    key = ApiKey.from_config(KeyConfig(name="a", sha256="0" * 64, models=["x"]))
    assert key.may_use("x") and not key.may_use("y")
    assert ApiKey.from_config(KeyConfig(name="a", sha256="0" * 64)).may_use("anything")
