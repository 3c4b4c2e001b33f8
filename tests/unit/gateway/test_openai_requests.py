from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.openai_requests import MAX_JSON_DEPTH, chat_prompt_bytes, parse_body

MSG = b'"messages":[{"role":"user","content":"hi"}]'


def test_chat_body_is_parsed_for_routing() -> None:
    p = parse_body("chat/completions", b'{"model":"m","stream":true,"max_tokens":7,' + MSG + b"}")
    assert (p.model, p.stream, p.wants_usage, p.max_tokens) == ("m", True, False, 7)
    assert p.prompt == chat_prompt_bytes([{"role": "user", "content": "hi"}])


def test_prompt_bytes_are_prefix_stable() -> None:
    short = chat_prompt_bytes([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}])
    longer = chat_prompt_bytes([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                {"role": "assistant", "content": [{"type": "text", "text": "b"}]}])
    assert longer.startswith(short)


@pytest.mark.parametrize(("route", "raw", "param"), [
    ("chat/completions", b"{not json", None),
    ("chat/completions", b"[1,2]", None),
    ("chat/completions", b'{"messages":[]}', "model"),
    ("chat/completions", b'{"model":5,' + MSG + b"}", "model"),
    ("chat/completions", b'{"model":"m","messages":"hi"}', "messages"),
    ("chat/completions", b'{"model":"m","messages":[{"content":"x"}]}', "messages[0]"),
    ("chat/completions", b'{"model":"m","messages":[{"role":"user","content":5}]}', "messages[0].content"),
    ("chat/completions", b'{"model":"m","stream":"yes",' + MSG + b"}", "stream"),
    ("chat/completions", b'{"model":"m","max_tokens":"10",' + MSG + b"}", "max_tokens"),
    ("chat/completions", b'{"model":"m","max_tokens":true,' + MSG + b"}", "max_tokens"),
    ("chat/completions", b'{"model":"m","max_tokens":0,' + MSG + b"}", "max_tokens"),
    ("chat/completions", b'{"model":"m","temperature":"hot",' + MSG + b"}", "temperature"),
    ("completions", b'{"model":"m","prompt":7}', "prompt"),
    ("embeddings", b'{"model":"m"}', "input"),
])
def test_bad_input_names_the_parameter(route: str, raw: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(route, raw)
    assert info.value.param == param
    assert info.value.status == 400


def test_embeddings_never_stream() -> None:
    assert not parse_body("embeddings", b'{"model":"m","input":"x","stream":true}').stream


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1024])
def test_bodies_nested_past_the_limit_are_refused_whatever_the_route(depth: int) -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * depth + b"]" * depth + b"}"
    for route in ("chat/completions", "completions", "embeddings"):
        with pytest.raises(InvalidRequest) as info:
            parse_body(route, raw)
        assert info.value.code == "nesting_too_deep"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # The body object is level 1, so MAX_JSON_DEPTH - 1 nested arrays under a field reach the limit.
    inner = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + inner + b"}"
    assert parse_body("chat/completions", raw).model == "m"
    wide = b'{"model": "m", "prompt": [' + b",".join([b"[1]"] * 5000) + b"]}"
    assert parse_body("completions", wide).model == "m"


@pytest.mark.parametrize("dimensions", [1_000_000_000, 65_537, 0, -1, 1.5, "8", True])
def test_embedding_dimensions_are_capped_before_any_backend_sees_them(dimensions: object) -> None:
    # A simulator asked for 10^9 dimensions spun at full CPU and grew past 2 GB: the gateway
    # refuses such a request itself, whatever the backend would do with it.
    import orjson
    raw = orjson.dumps({"model": "m", "input": "hi", "dimensions": dimensions})
    with pytest.raises(InvalidRequest) as err:
        parse_body("embeddings", raw)
    assert err.value.param == "dimensions"


def test_embedding_dimensions_within_the_cap_pass() -> None:
    assert parse_body("embeddings", b'{"model": "m", "input": "hi", "dimensions": 3072}').body["dimensions"] == 3072
