from __future__ import annotations

from dataclasses import dataclass

import pytest

from policies.config import PriorityConfig
from policies.errors import InvalidPriority
from policies.priority import resolve_priority, should_shed


@dataclass
class M:
    waiting: int


@dataclass
class E:
    waiting: int | None  # None: no fresh metrics
    inflight_requests: int = 0
    healthy: bool = True
    circuit_open: bool = False
    models: tuple[str, ...] = ("m",)

    def serves(self, model: str) -> bool:
        return model in self.models

    def trusted_metrics(self) -> M | None:
        return M(self.waiting) if self.waiting is not None else None


CFG = PriorityConfig(shed_waiting_threshold=4)


@pytest.mark.parametrize(("header", "default", "want"), [
    (None, "standard", "standard"), ("", "sheddable", "sheddable"), ("Critical", "standard", "critical"),
    (" sheddable ", "critical", "sheddable"),
])
def test_priority_from_header_or_key_default(header: str | None, default: str, want: str) -> None:
    assert resolve_priority(header, default) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(("header", "default", "maximum", "want"), [
    ("critical", "standard", "standard", "standard"),  # self-promotion is capped
    ("Critical", "sheddable", "standard", "standard"),
    ("critical", "standard", "critical", "critical"),  # up to what the key may ask for
    ("standard", "sheddable", "standard", "standard"),
    ("sheddable", "critical", "critical", "sheddable"),  # asking for less is always allowed
    (None, "sheddable", "standard", "sheddable"),
])
def test_header_priority_is_capped_at_the_keys_maximum(header: str | None, default: str, maximum: str,
                                                       want: str) -> None:
    assert resolve_priority(header, default, maximum) == want  # type: ignore[arg-type]


def test_unknown_priority_is_a_400() -> None:
    with pytest.raises(InvalidPriority):
        resolve_priority("urgent", "standard")


@pytest.mark.parametrize(("priority", "endpoints", "cfg", "shed"), [
    ("sheddable", [E(4), E(9)], CFG, True),
    ("sheddable", [E(4), E(3)], CFG, False),  # one endpoint still has room
    ("standard", [E(40), E(90)], CFG, False),
    ("critical", [E(40)], CFG, False),
    ("sheddable", [E(40), E(0, healthy=False)], CFG, True),  # unhealthy ones are not eligible
    ("sheddable", [E(40), E(0, models=("other",))], CFG, True),
    ("sheddable", [E(0, circuit_open=True)], CFG, False),  # nothing eligible: routing answers
    ("sheddable", [E(None, inflight_requests=50)], CFG, False),  # no fresh metrics: do not guess
    ("sheddable", [E(None, inflight_requests=50)], PriorityConfig(shed_inflight_threshold=50), True),
    ("sheddable", [E(40)], PriorityConfig(shed=False), False),
])
def test_shedding(priority: str, endpoints: list[E], cfg: PriorityConfig, shed: bool) -> None:
    assert should_shed(priority, "m", endpoints, cfg) is shed  # type: ignore[arg-type]
