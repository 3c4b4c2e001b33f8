"""The simulator's HTTP face: a Starlette app speaking vLLM's OpenAI-compatible API over the engine.

Also serves /metrics with vLLM names; the tokenizer endpoints are in token_routes.py, /admin in admin_routes.py.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import os
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from simulator import tokenizer
from simulator.admin_routes import AdminRoutes
from simulator.embeddings import embedding, embedding_dims, embedding_inputs
from simulator.engine import Engine, EngineConfig, SimRequest, TokenEvent
from simulator.faults import Faults
from simulator.json_io import api_error, json_body, json_response
from simulator.kv_events import KVEventsSetup, SimKVEvents
from simulator.metrics import build_registry, render
from simulator.openai_api import (
    ApiError,
    GenerateParams,
    chunk,
    full_response,
    parse_generate,
    resolve_model,
    tool_chunk,
    usage,
)
from simulator.profiles import get_profile
from simulator.runner import EngineRunner, RequestStream
from simulator.token_routes import TokenRoutes
from simulator.tools import message_shapes


@dataclass
class SimServerConfig:
    """Everything one simulated vLLM replica needs; `engine` usually comes from a profile."""

    model: str = "sim-llama"
    served_model_names: list[str] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=lambda: get_profile("tiny"))
    time_scale: float = 1.0
    lora_modules: dict[str, str] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    request_log_size: int = 256
    embedding_dim: int = 384
    api_prefixes: tuple[str, ...] = ("/v1",)
    """Where the OpenAI routes are served; KServe's vLLM runtime uses /openai/v1."""
    kv_events: KVEventsSetup | None = None
    """Publish KV-cache events over ZMQ as vLLM's --kv-events-config does (simulator/kv_events.py)."""

    @property
    def names(self) -> list[str]:
        return self.served_model_names or [self.model]


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class _Aborted(Exception):
    """The engine was reset under a running request."""


class SimServer:
    """Per-app state (no globals): the runner, the faults, and the recent request records."""

    def __init__(self, cfg: SimServerConfig) -> None:
        self.cfg = cfg
        self.faults = dataclasses.replace(cfg.faults)
        self.kv_events = (SimKVEvents(cfg.kv_events, lora_paths=cfg.lora_modules)
                          if cfg.kv_events is not None and cfg.kv_events.config.active else None)
        self.runner = EngineRunner(self._new_engine, cfg.time_scale)
        self.records: deque[dict[str, Any]] = deque(maxlen=cfg.request_log_size)
        self.registry = build_registry(lambda: self.runner, cfg.names[0], cfg.engine.max_loras)
        self._ids = itertools.count()
        self.created = int(time.time())
        self.calls: Counter[str] = Counter()

    def _new_engine(self) -> Engine:
        if self.kv_events is not None:
            return Engine(dataclasses.replace(self.cfg.engine), tokenizer.output_tokens,
                          block_hasher=self.kv_events.hasher, kv_events=self.kv_events.recorder())
        return Engine(dataclasses.replace(self.cfg.engine), tokenizer.output_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Load the tokenizer before the port opens: loading it on the first request took ~1 s on a
        # busy machine, which a gateway with a short read timeout saw as a dead backend.
        tokenizer.encode("warm up")
        task = asyncio.create_task(self.runner.run(), name="sim-engine-loop")
        replay = asyncio.create_task(self.kv_events.run(), name="sim-kv-replay") if self.kv_events else None
        try:
            yield
        finally:
            for t in (task, replay):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            if self.kv_events is not None:
                self.kv_events.close()

    # ---- generation ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        body = await json_body(request)
        p = parse_generate(kind, body, self.cfg.names, self.cfg.lora_modules, self.runner.engine.max_model_len,
                           self.cfg.engine.scheduling_policy == "priority")
        base_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{base_id}"
        record: dict[str, Any] = {
            "request_id": rid, "path": request.url.path, "model": p.model,
            "traceparent": request.headers.get("traceparent"), "tracestate": request.headers.get("tracestate"),
            "prompt_tokens": len(p.prompt_token_ids), "cached_tokens": None, "completion_tokens": 0,
            "finish_reason": None, "status": "running", "stream": p.stream,
            "timings": {"received_at": time.time(), "first_token_s": None, "e2e_s": None}}
        if kind == "chat":
            # Roles and tool-call ids only: what a test needs to see of the history, never its text.
            record["messages"] = message_shapes(body.get("messages"))
            record["tool_call"] = ({"id": p.tool_call.id, "name": p.tool_call.name}
                                   if p.tool_call is not None else None)
        self.records.append(record)
        headers = {"x-request-id": base_id}
        failure = self.faults.take_failure()
        if failure is not None:
            record["status"] = f"failed:{failure}"
            raise ApiError(failure, f"Injected failure (simulator fault, status {failure}).")
        sim = SimRequest(f"{rid}-{next(self._ids)}", p.prompt_token_ids, p.max_tokens, cache_salt=p.cache_salt,
                         priority=p.priority, lora=p.lora, ignore_eos=p.ignore_eos, seed=p.seed,
                         output_offset=p.output_offset)
        try:
            stream = self.runner.submit(sim)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        events = self._events(stream, record, self.faults.take_exit())
        if p.stream:
            return StreamingResponse(self._sse(p, rid, events), media_type="text/event-stream", headers=headers)
        collect = asyncio.ensure_future(_collect(events))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                # The client left: cancelling closes the stream, which aborts the sequence.
                collect.cancel()
                record["status"] = "client_disconnected"
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)
        try:
            ids, last = collect.result()
        except _Aborted:
            raise ApiError(503, "The engine was restarted while serving this request.") from None
        cached, finish = (last.num_cached_tokens, last.finish_reason) if last else (0, None)
        use = usage(len(p.prompt_token_ids), len(ids), cached)
        return json_response(full_response(p, rid, tokenizer.decode(ids), finish, use), headers=headers)

    async def _events(self, stream: RequestStream, record: dict[str, Any],
                      exit_after: int | None) -> AsyncIterator[TokenEvent]:
        """Engine events with the fault switches applied, keeping the request record current."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        emitted = 0
        timings = record["timings"]
        async with stream:
            while True:
                if exit_after is not None and emitted >= exit_after:
                    os._exit(17)  # a crash: no cleanup, no response end
                stall = self.faults.stall_after
                if stall is not None and emitted >= stall:
                    record["status"] = "stalled"
                    await stream.aclose()
                    await asyncio.Event().wait()  # held open until the client goes away
                try:
                    ev = await anext(stream)
                except StopAsyncIteration:
                    return
                if ev.finish_reason == "abort":
                    record["status"] = "aborted"
                    raise _Aborted
                if ev.is_first:
                    wait = self.faults.latency_ms / 1000 - (loop.time() - start)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    record["cached_tokens"] = ev.num_cached_tokens
                    timings["first_token_s"] = loop.time() - start
                emitted += len(ev.token_ids)
                record["completion_tokens"] = emitted
                if ev.finished:
                    record["finish_reason"], record["status"] = ev.finish_reason, "finished"
                    timings["e2e_s"] = loop.time() - start
                yield ev

    async def _sse(self, p: GenerateParams, rid: str, events: AsyncIterator[TokenEvent]) -> AsyncIterator[bytes]:
        n_prompt, completion, cached = len(p.prompt_token_ids), 0, 0
        try:
            async for ev in events:
                if ev.is_first and p.kind == "chat":
                    # vLLM emits the role chunk with the first engine output, i.e. after prefill.
                    yield _sse(chunk(p, rid, "", None, role=True))
                    if p.tool_call is not None:
                        yield _sse(tool_chunk(p, rid, p.tool_call.opening_delta()))
                before = completion
                completion += len(ev.token_ids)
                cached = ev.num_cached_tokens if ev.is_first else cached
                use = usage(n_prompt, completion, cached) if p.include_usage and p.continuous_usage else None
                if p.tool_call is not None:
                    # The engine paces the call's tokens; its own token ids stand in for them.
                    fragment = p.tool_call.arguments_delta(p.tool_call.fragment(before, completion))
                    finish = p.tool_call.finish(completion) if ev.finished else None
                    yield _sse(tool_chunk(p, rid, fragment, finish, use=use))
                    continue
                text = tokenizer.decode(ev.token_ids)
                yield _sse(chunk(p, rid, text, ev.finish_reason if ev.finished else None, use=use))
        except _Aborted:
            yield _sse(ApiError(503, "The engine was restarted while serving this request.").body())
            return
        if p.include_usage:
            yield _sse(chunk(p, rid, None, None, use=usage(n_prompt, completion, cached)))
        yield b"data: [DONE]\n\n"

    # ---- other OpenAI/vLLM endpoints -------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        body = await json_body(request)
        model, _ = resolve_model(body, self.cfg.names, self.cfg.lora_modules)
        inputs = embedding_inputs(body.get("input"), self.runner.engine.max_model_len)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'", "encoding_format")
        dims = embedding_dims(body.get("dimensions"), model, self.cfg.embedding_dim)
        data = []
        for i, ids in enumerate(inputs):
            if i and i % 256 == 0:
                await asyncio.sleep(0)  # a large batch must not starve /health, other requests or shutdown
            vec = embedding(ids, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        total = sum(map(len, inputs))
        return json_response({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                              "model": model, "data": data,
                              "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0,
                                        "prompt_tokens_details": None}})

    async def models(self, request: Request) -> Response:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": root,
                    "parent": parent, "max_model_len": self.runner.engine.max_model_len,
                    "permission": [{"id": f"modelperm-{name}", "object": "model_permission",
                                    "created": self.created, "allow_create_engine": False,
                                    "allow_sampling": True, "allow_logprobs": True,
                                    "allow_search_indices": False, "allow_view": True,
                                    "allow_fine_tuning": False, "organization": "*", "group": None,
                                    "is_blocking": False}]}
        base = self.cfg.names[0]
        data = [card(n, self.cfg.model, None) for n in self.cfg.names]
        data += [card(n, path, base) for n, path in self.cfg.lora_modules.items()]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return json_response({"version": "0.0.0+gravity-sim"})

    async def metrics(self, request: Request) -> Response:
        if self.faults.metrics_delay_ms:
            await asyncio.sleep(self.faults.metrics_delay_ms / 1000)
        return Response(render(self.registry), media_type=CONTENT_TYPE_LATEST)


async def _collect(events: AsyncIterator[TokenEvent]) -> tuple[list[int], TokenEvent | None]:
    ids: list[int] = []
    last: TokenEvent | None = None
    async for ev in events:
        ids += ev.token_ids
        last = ev
    return ids, last


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only disconnect remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(cfg: SimServerConfig) -> Starlette:
    """A Starlette app for one simulated replica; its engine loop lives in the app's lifespan."""
    sim = SimServer(cfg)
    routes = [
        route
        for prefix in cfg.api_prefixes
        for route in (
            Route(f"{prefix}/chat/completions", sim.chat, methods=["POST"]),
            Route(f"{prefix}/completions", sim.completions, methods=["POST"]),
            Route(f"{prefix}/embeddings", sim.embeddings, methods=["POST"]),
            Route(f"{prefix}/models", sim.models, methods=["GET"]),
        )
    ] + [
        Route("/health", sim.health, methods=["GET"]),
        Route("/version", sim.version, methods=["GET"]),
        Route("/metrics", sim.metrics, methods=["GET"]),
    ] + TokenRoutes(cfg, sim.runner).routes() + AdminRoutes(sim).routes()
    app = Starlette(routes=routes, lifespan=sim.lifespan, exception_handlers={ApiError: api_error},
                    middleware=[Middleware(_CountCalls, calls=sim.calls)])
    app.state.sim = sim
    return app


class _CountCalls:
    """Counts HTTP requests per path (a dict increment; pure ASGI, so nothing else is wrapped)."""

    def __init__(self, app: ASGIApp, calls: Counter[str]) -> None:
        self.app, self.calls = app, calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls[scope["path"]] += 1
        await self.app(scope, receive, send)
