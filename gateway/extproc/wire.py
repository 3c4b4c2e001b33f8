"""The endpoint-picker protocol on ext_proc messages: what Envoy tells the picker, and the answers.

Pure functions over the generated messages (no I/O), so the stream handler reads as the protocol.
Spec: gateway-api-inference-extension docs/proposals/004-endpoint-picker-protocol.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.extproc.pb import core, ep, http_status, struct_pb2

__all__ = [
    "DESTINATION",
    "LB_NAMESPACE",
    "SCORES",
    "SERVED",
    "SUBSET",
    "SUBSET_NAMESPACE",
    "body_chunks",
    "destination_metadata",
    "header_list_mutation",
    "header_mutation",
    "headers_of",
    "immediate",
    "served_endpoint",
    "subset_hint",
]

LB_NAMESPACE = "envoy.lb"
DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SCORES = "x-gateway-destination-endpoint-scores"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET = "x-gateway-destination-endpoint-subset"
FILTER_NAME = "envoy.filters.http.ext_proc"
"""Envoy keys the attributes it sends by the filter's name; config/envoy*.yaml use this one."""
UPSTREAM_ADDRESS = "upstream.address"

# Envoy's own limit per streamed message is 64 KiB in some builds; stay under it.
MAX_CHUNK = 62_000

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def headers_of(headers: ep.HttpHeaders) -> dict[str, str]:
    """Lower-cased names to values; the first of repeated headers wins, as Starlette's `get` does."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        key = h.key.lower()
        if key not in out:
            out[key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def _addresses(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def subset_hint(metadata: core.Metadata) -> list[str] | None:
    """The endpoints the data plane allows (a list, or a comma-separated string); None: no hint."""
    ns = metadata.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET not in ns.fields:
        return None
    value = _plain(ns.fields[SUBSET])
    return _addresses(value)


def served_endpoint(req: ep.ProcessingRequest) -> str | None:
    """Which endpoint answered: `envoy.lb` served metadata where the proxy reports it, else the
    upstream address attribute Envoy attaches to the response headers."""
    lb = req.metadata_context.filter_metadata.get(LB_NAMESPACE)
    if lb is not None and SERVED in lb.fields:
        found = _addresses(_plain(lb.fields[SERVED]))
        if found:
            return found[0]
    attrs = req.attributes.get(FILTER_NAME)
    if attrs is not None and UPSTREAM_ADDRESS in attrs.fields:
        value = _plain(attrs.fields[UPSTREAM_ADDRESS])
        if isinstance(value, str) and value:
            return value
    return None


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    return None


def destination_metadata(addresses: list[str], scores: Mapping[str, float] | None) -> struct_pb2.Struct:
    """`envoy.lb` dynamic metadata naming the ranked endpoints (the header carries the same value)."""
    md = struct_pb2.Struct()
    lb = md.fields[LB_NAMESPACE].struct_value
    lb.fields[DESTINATION].string_value = ",".join(addresses)
    if scores:
        table = lb.fields[SCORES].struct_value
        for address, score in scores.items():
            table.fields[address].number_value = score
    return md


def header_mutation(set_: Mapping[str, str], remove: Iterable[str] = ()) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[core.HeaderValueOption(header=core.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                            append_action=_OVERWRITE) for k, v in set_.items()],
        remove_headers=list(remove),
    )


def header_list_mutation(pairs: Iterable[tuple[str, str]]) -> ep.HeaderMutation:
    """Headers that may repeat (an app's answer): the first of a name overwrites, the rest append."""
    seen: set[str] = set()
    out = []
    for k, v in pairs:
        action = core.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD if k in seen else _OVERWRITE
        seen.add(k)
        out.append(core.HeaderValueOption(header=core.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                          append_action=action))
    return ep.HeaderMutation(set_headers=out)


def immediate(err: GatewayError, headers: Mapping[str, str] | None = None) -> ep.ProcessingResponse:
    """The one error mapping's answer as an ImmediateResponse: same status, body and headers as
    `gateway.errors.error_response` gives the proxy's clients."""
    out = {**err.headers, **(headers or {}), "content-type": "application/json"}
    if err.retry_after is not None:
        out["retry-after"] = str(max(1, math.ceil(err.retry_after)))
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status.HttpStatus(code=err.status),
        headers=header_mutation(out),
        body=orjson.dumps(err.body()),
        details=f"gravity_{err.code or 'error'}",
    ))


def body_chunks(body: bytes, end_of_stream: bool) -> list[ep.StreamedBodyResponse]:
    """A body as streamed responses of at most MAX_CHUNK bytes (one, possibly empty, at least)."""
    if len(body) <= MAX_CHUNK:
        return [ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)]
    parts = [body[i:i + MAX_CHUNK] for i in range(0, len(body), MAX_CHUNK)]
    return [ep.StreamedBodyResponse(body=p, end_of_stream=end_of_stream and i == len(parts) - 1)
            for i, p in enumerate(parts)]
