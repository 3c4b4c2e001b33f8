from __future__ import annotations

from gateway.sse import EventSplitter, usage_of


def test_events_split_across_chunk_boundaries() -> None:
    s = EventSplitter()
    assert s.feed(b"data: {\"a\":") == []
    assert s.feed(b"1}\n\ndata: [DO") == [b'data: {"a":1}\n\n']
    assert s.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]
    assert s.rest() == b""


def test_crlf_separators_and_trailing_rest() -> None:
    s = EventSplitter()
    assert s.feed(b"data: 1\r\n\r\ndata: 2") == [b"data: 1\r\n\r\n"]
    assert s.rest() == b"data: 2"


def test_usage_only_chunk_is_recognised() -> None:
    usage, only = usage_of(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n')
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2} and only
    usage, only = usage_of(b'data: {"choices":[{"delta":{}}],"usage":null}\n\n')
    assert usage is None and not only
    assert usage_of(b"data: [DONE]\n\n") == (None, False)
    assert usage_of(b'data: {"choices":[{"delta":{"content":"usage"}}]}\n\n') == (None, False)


def test_only_null_usage_and_whole_event_pieces_split_back() -> None:
    from gateway.sse import only_null_usage, split_events
    assert only_null_usage(b'data: {"choices":[],"usage":null}\n\ndata: {"usage":null}\n\n')
    assert not only_null_usage(b'data: {"usage":null}\n\ndata: {"usage":{"prompt_tokens":1}}\n\n')
    assert split_events(b"data: 1\n\ndata: 2\n\n") == [b"data: 1\n\n", b"data: 2\n\n"]
    assert split_events(b"data: 1\n\ndata: 2") == [b"data: 1\n\n", b"data: 2"]
