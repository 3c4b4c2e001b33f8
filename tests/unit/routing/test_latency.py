"""The online TTFT model and its wiring into the datastore (features at begin, fit at the first token)."""
from __future__ import annotations

import random

import pytest

from routing.latency import PRIOR, TTFTModel
from tests.unit.routing.helpers import FakeClock, make_datastore


@pytest.mark.parametrize("tokens_per_s", [2857.0, 5555.0, 11000.0])
def test_the_fit_recovers_a_replicas_speed(tokens_per_s: float) -> None:
    rng = random.Random(1)
    model = TTFTModel()
    for _ in range(200):
        ahead, inflight = rng.uniform(100, 20_000), rng.randint(0, 40)
        model.update(ahead, inflight, 0.03 + ahead / tokens_per_s + 0.0003 * inflight + rng.gauss(0, 0.02))
    c = model.coefficients
    assert 1 / c.per_token_s == pytest.approx(tokens_per_s, rel=0.05)
    assert c.samples == 200
    assert c.predict(10_000, 10) == pytest.approx(0.03 + 10_000 / tokens_per_s + 0.003, rel=0.05)


def test_the_fit_follows_a_replica_that_slows_down() -> None:
    model = TTFTModel()
    for _ in range(100):
        for ahead in (1000, 5000, 9000):
            model.update(ahead, 4, ahead / 5000)
    for _ in range(100):
        for ahead in (1000, 5000, 9000):
            model.update(ahead, 4, ahead / 2500)
    assert 1 / model.coefficients.per_token_s == pytest.approx(2500, rel=0.05)


def test_nonsense_samples_are_ignored_and_coefficients_stay_physical() -> None:
    model = TTFTModel()
    model.update(1000, 2, float("nan"))
    model.update(-5, 2, 0.1)
    assert model.coefficients == PRIOR
    for _ in range(50):
        model.update(10_000, 0, 0.0)  # a cache hit we did not know of: "free" prefill
    c = model.coefficients
    assert c.per_token_s > 0 and c.base_s >= 0 and c.per_inflight_s >= 0


def test_the_datastore_fits_each_endpoint_on_its_own_first_tokens() -> None:
    clock = FakeClock(0.0)
    ds = make_datastore(["fast", "slow"], clock=clock)
    for _ in range(60):
        for name, rate in (("fast", 6000.0), ("slow", 2000.0)):
            ticket = ds.begin(name, 3000, 16)
            clock.now += 3000 / rate
            ds.first_token(ticket)
            ds.end(ticket)
    views = ds.snapshot().endpoints
    assert views["fast"].ttft.predict(3000, 0) < views["slow"].ttft.predict(3000, 0) / 2
    assert views["slow"].ttft.samples == 60


def test_a_ticket_from_before_a_restart_does_not_train_the_model() -> None:
    clock = FakeClock(0.0)
    ds = make_datastore(["a"], clock=clock)
    ticket = ds.begin("a", 1000, 8)
    ds.on_restart("a")
    clock.now += 50.0
    ds.first_token(ticket)
    assert ds.snapshot().endpoints["a"].ttft.samples == 0
