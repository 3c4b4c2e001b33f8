"""The plugin registry: type name -> factory, built explicitly (importing a plugin registers nothing).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from routing.plugins import (
    cache_aware,
    healthy,
    imbalance_guard,
    kv_cache,
    least_request,
    load_guard,
    lora_affinity,
    lora_capable,
    max_score,
    model_served,
    power_of_two,
    precise_prefix,
    predicted_latency,
    prefill_cost,
    prefix_scorer,
    queue,
    random_picker,
    round_robin,
    session,
    weighted_random,
)
from routing.plugins.base import PluginFactory

__all__ = ["Registry", "default_registry"]


class Registry:
    def __init__(self, factories: Iterable[PluginFactory] = ()) -> None:
        self._factories: dict[str, PluginFactory] = {}
        for f in factories:
            self.add(f)

    def add(self, factory: PluginFactory) -> None:
        if factory.type_name in self._factories:
            raise ValueError(f"plugin type '{factory.type_name}' registered twice")
        self._factories[factory.type_name] = factory

    def get(self, type_name: str) -> PluginFactory | None:
        return self._factories.get(type_name)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._factories

    def __iter__(self) -> Iterator[PluginFactory]:
        return iter(self._factories.values())

    def types(self) -> list[str]:
        return sorted(self._factories)


def default_registry() -> Registry:
    """Every built-in plugin; embedders add their own with :meth:`Registry.add` on a fresh copy."""
    return Registry(
        [
            model_served.FACTORY,
            healthy.FACTORY,
            lora_capable.FACTORY,
            prefix_scorer.FACTORY,
            precise_prefix.FACTORY,
            queue.FACTORY,
            prefill_cost.FACTORY,
            predicted_latency.FACTORY,
            kv_cache.FACTORY,
            session.FACTORY,
            lora_affinity.FACTORY,
            load_guard.FACTORY,
            least_request.FACTORY,
            max_score.FACTORY,
            imbalance_guard.FACTORY,
            weighted_random.FACTORY,
            power_of_two.FACTORY,
            random_picker.FACTORY,
            round_robin.FACTORY,
            cache_aware.FACTORY,
        ]
    )
