from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from routing.config import RoutingConfig, load_routing_config
from routing.plugins.registry import default_registry


def _errors(data: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as info:
        RoutingConfig.model_validate(data)
    return str(info.value)


def test_defaults_validate_and_name_a_default_profile() -> None:
    cfg = RoutingConfig()
    assert cfg.profile(None) is not None
    assert cfg.scrape_interval_s == 0.1 and cfg.stale_after_s == 2.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"profiles": [{"name": "p", "plugins": [{"ref": "queue"}, {"ref": "queue"}, {"ref": "x"}]}]},
            "routing.profiles[0].plugins[2].ref: unknown plugin 'x'",
        ),
        ({"plugins": [{"type": "nope"}]}, "routing.plugins[0].type: unknown plugin type 'nope'"),
        (
            {"plugins": [{"type": "queue-scorer", "params": {"scale": -1}}]},
            "routing.plugins[0].params.scale: Input should be greater than 0",
        ),
        (
            {"plugins": [{"type": "queue-scorer", "params": {"bogus": 1}}]},
            "routing.plugins[0].params.bogus: Extra inputs are not permitted",
        ),
        (
            {"profiles": [{"name": "p", "plugins": [{"ref": "healthy"}]}]},
            "routing.profiles[0].plugins[0].ref: 'healthy' is a filter, not a scorer",
        ),
        ({"profiles": [{"name": "p", "picker": "queue-scorer"}]}, "routing.profiles[0].picker"),
        ({"profiles": [{"name": "p", "filters": ["zzz"]}]}, "routing.profiles[0].filters[0]: unknown plugin"),
        ({"default_profile": "missing"}, "routing.default_profile: unknown profile 'missing'"),
        (
            {"plugins": [{"type": "queue-scorer"}, {"type": "queue-scorer"}]},
            "routing.plugins[1].name: duplicate plugin name 'queue-scorer'",
        ),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_config_names_the_path(data: dict[str, object], message: str) -> None:
    assert message in _errors(data)


def test_embeds_in_a_root_config_and_reads_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    class Root(BaseModel):
        model_config = ConfigDict(extra="forbid")
        routing: RoutingConfig = RoutingConfig()

    with pytest.raises(ValidationError) as info:
        Root.model_validate({"routing": {"profiles": [{"name": "p", "plugins": [{"ref": "x"}]}]}})
    assert "routing.profiles[0].plugins[0].ref" in str(info.value)

    path = tmp_path / "g.yaml"
    path.write_text(
        "routing:\n  plugins:\n    - {type: queue-scorer, name: q}\n"
        "  profiles:\n    - {name: only, plugins: [{ref: q, weight: 2}]}\n"
    )
    cfg = load_routing_config(path)
    assert cfg.profiles[0].plugins[0].weight == 2


def test_shipped_routing_yaml_validates_and_matches_defaults() -> None:
    from pathlib import Path

    cfg = load_routing_config(Path(__file__).resolve().parents[3] / "config" / "routing.yaml")
    default = RoutingConfig()
    assert cfg.profiles[0].plugins == default.profiles[0].plugins
    assert cfg.profiles[0].filters == default.profiles[0].filters
    # The tuned parameters too: the YAML spells them out, the plugins' own defaults carry them.
    registry = default_registry()
    shipped = {p.key: p for p in cfg.plugins}
    for spec in default.plugins:
        factory = registry.get(spec.type)
        assert factory is not None and spec.key in shipped
        assert factory.params.model_validate(shipped[spec.key].params) == factory.params.model_validate(spec.params)
