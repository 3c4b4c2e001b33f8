from __future__ import annotations

import dataclasses
import inspect

import pytest

from routing.latency import PRIOR
from routing.types import EndpointView, PrefixMatch, RoutingRequest, Snapshot, _one_write_init, evolve

FAST = (EndpointView, RoutingRequest, PrefixMatch, Snapshot)


def _plain_copy(cls: type) -> type:
    """The same fields as an ordinary frozen dataclass: the reference the one-write __init__ must match."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                 compare=f.compare, repr=f.repr))
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True)


@pytest.mark.parametrize("cls", FAST)
def test_the_one_write_init_keeps_the_generated_signature(cls: type) -> None:
    assert str(inspect.signature(cls.__init__)) == str(inspect.signature(_plain_copy(cls).__init__))


def test_instances_hold_what_the_generated_init_would_give_them() -> None:
    req = RoutingRequest("m", b"p", lora="a", max_tokens=3)
    ref = _plain_copy(RoutingRequest)("m", b"p", lora="a", max_tokens=3)
    assert vars(req) == vars(ref)
    assert req == RoutingRequest(model="m", prompt=b"p", lora="a", max_tokens=3) and hash(req) == hash(
        RoutingRequest("m", b"p", lora="a", max_tokens=3))
    assert dataclasses.replace(req, model="n").model == "n" and dataclasses.replace(req, model="n").lora == "a"
    view = EndpointView("e", "u", None, frozenset(), True, "", False, None, False, 0, 0, 0, 0)
    assert view.ttft is PRIOR and view.foreign_requests == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.model = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        RoutingRequest("m")  # type: ignore[call-arg]


def test_a_default_factory_is_called_per_instance() -> None:
    a, b = PrefixMatch({"e": 1.0}), PrefixMatch({"e": 1.0})
    assert a.free == {} and a.free is not b.free
    assert PrefixMatch({}, free={"e": 0.5}).free == {"e": 0.5}


def test_fields_it_cannot_copy_are_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class NotInit:
        items: int = dataclasses.field(default=0, init=False)

    with pytest.raises(TypeError):
        _one_write_init(NotInit)


def test_evolve_builds_what_dataclasses_replace_builds() -> None:
    base = RoutingRequest(model="m", prompt=b"p" * 100, session_id="s")
    for changes in ({"prompt_tokens": 7}, {"session_endpoint": "e1", "priority": "batch"}, {}):
        got, want = evolve(base, **changes), dataclasses.replace(base, **changes)
        assert got == want and got.__dict__ == want.__dict__ and type(got) is RoutingRequest
    assert base.prompt_tokens == 0 and base.session_endpoint is None  # the original is untouched
    match = PrefixMatch(cached={"e": 0.5})
    assert evolve(match, share=0.25) == dataclasses.replace(match, share=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(base, prompt_tokens=1).prompt_tokens = 2  # type: ignore[misc]


def test_evolve_refuses_a_field_the_class_does_not_have() -> None:
    with pytest.raises(TypeError, match="no field"):
        evolve(RoutingRequest(model="m", prompt=b""), prompt_token=3)
