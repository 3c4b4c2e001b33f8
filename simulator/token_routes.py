"""The simulator's tokenizer endpoints: vLLM's `/tokenize`, `/detokenize` and the render endpoints
(`POST /v1/chat/completions/render`, `/v1/completions/render`) that token-indexing routers call."""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator import tokenizer
from simulator.json_io import json_body, json_response
from simulator.openai_api import ApiError, GenerateParams, chat_prompt_text, parse_generate, resolve_model

if TYPE_CHECKING:
    from simulator.runner import EngineRunner
    from simulator.server import SimServerConfig


class TokenRoutes:
    """Token ids for a request without generating; reads the config and the runner's engine limits."""

    def __init__(self, cfg: SimServerConfig, runner: EngineRunner) -> None:
        self._cfg, self._runner = cfg, runner

    def routes(self) -> list[Route]:
        return [route for prefix in self._cfg.api_prefixes for route in (
            Route(f"{prefix}/chat/completions/render", self.render_chat, methods=["POST"]),
            Route(f"{prefix}/completions/render", self.render_completion, methods=["POST"]),
        )] + [Route("/tokenize", self.tokenize, methods=["POST"]),
              Route("/detokenize", self.detokenize, methods=["POST"])]

    async def render_chat(self, request: Request) -> Response:
        """vLLM's `POST /v1/chat/completions/render`: the request as token ids, no generation. Routers
        that index prefixes by token (vllm-router's cache_aware) call it on the workers."""
        body = await json_body(request)
        return json_response(self._rendered(parse_generate(
            "chat", body, self._cfg.names, self._cfg.lora_modules, self._runner.engine.max_model_len,
            self._cfg.engine.scheduling_policy == "priority"), body))

    async def render_completion(self, request: Request) -> Response:
        """vLLM's `POST /v1/completions/render`: a list with one rendered request per prompt."""
        body = await json_body(request)
        return json_response([self._rendered(parse_generate(
            "completion", body, self._cfg.names, self._cfg.lora_modules, self._runner.engine.max_model_len,
            self._cfg.engine.scheduling_policy == "priority"), body)])

    @staticmethod
    def _rendered(p: GenerateParams, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's GenerateRequest shape: the prompt's token ids plus the sampling parameters that the
        simulator honours (vLLM's SamplingParams has many more; they are not modelled here)."""
        options = body.get("stream_options")
        return {"request_id": uuid.uuid4().hex, "token_ids": p.prompt_token_ids, "features": None,
                "sampling_params": {"n": 1, "max_tokens": p.max_tokens, "seed": p.seed,
                                    "ignore_eos": p.ignore_eos, "temperature": body.get("temperature", 1.0),
                                    "top_p": body.get("top_p", 1.0), "stop": body.get("stop") or [],
                                    "stop_token_ids": body.get("stop_token_ids") or []},
                "model": p.model, "stream": p.stream, "stream_options": options if isinstance(options, dict) else None,
                "cache_salt": p.cache_salt, "priority": p.priority, "kv_transfer_params": None}

    async def tokenize(self, request: Request) -> Response:
        body = await json_body(request)
        resolve_model(body, self._cfg.names, self._cfg.lora_modules)
        if "messages" in body:
            ids = tokenizer.encode(chat_prompt_text(body))
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"])
        else:
            raise ApiError(400, "prompt must be a string (or send messages)", "prompt")
        return json_response({"count": len(ids), "max_model_len": self._runner.engine.max_model_len,
                              "tokens": ids, "token_strs": None})

    async def detokenize(self, request: Request) -> Response:
        body = await json_body(request)
        resolve_model(body, self._cfg.names, self._cfg.lora_modules)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens must be a list of integers", "tokens")
        try:
            return json_response({"prompt": tokenizer.decode(ids)})
        except (KeyError, ValueError) as exc:
            raise ApiError(400, f"invalid token ids: {exc}", "tokens") from exc
