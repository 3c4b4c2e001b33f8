"""The attribute and span names the gateway emits, against the GenAI and HTTP conventions they follow.

The GenAI conventions are in Development: when they rename something, this table and names.py change
together, on purpose."""
from __future__ import annotations

import pytest

from gateway.telemetry import names as N

CONVENTIONS = {
    # gen_ai.client.inference span (semantic-conventions-genai, docs/gen-ai/client-inference.md)
    "GEN_AI_OPERATION_NAME": "gen_ai.operation.name",
    "GEN_AI_PROVIDER_NAME": "gen_ai.provider.name",
    "GEN_AI_REQUEST_MODEL": "gen_ai.request.model",
    "GEN_AI_REQUEST_MAX_TOKENS": "gen_ai.request.max_tokens",
    "GEN_AI_REQUEST_TEMPERATURE": "gen_ai.request.temperature",
    "GEN_AI_REQUEST_TOP_P": "gen_ai.request.top_p",
    "GEN_AI_REQUEST_SEED": "gen_ai.request.seed",
    "GEN_AI_REQUEST_STREAM": "gen_ai.request.stream",
    "GEN_AI_REQUEST_CHOICE_COUNT": "gen_ai.request.choice.count",
    "GEN_AI_RESPONSE_MODEL": "gen_ai.response.model",
    "GEN_AI_RESPONSE_ID": "gen_ai.response.id",
    "GEN_AI_RESPONSE_FINISH_REASONS": "gen_ai.response.finish_reasons",
    "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK": "gen_ai.response.time_to_first_chunk",
    "GEN_AI_USAGE_INPUT_TOKENS": "gen_ai.usage.input_tokens",
    "GEN_AI_USAGE_OUTPUT_TOKENS": "gen_ai.usage.output_tokens",
    "GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS": "gen_ai.usage.cache_read.input_tokens",
    "GEN_AI_CONVERSATION_ID": "gen_ai.conversation.id",
    "GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID": "gen_ai.request.previous_response.id",
    "GEN_AI_INPUT_MESSAGES": "gen_ai.input.messages",
    "GEN_AI_OUTPUT_MESSAGES": "gen_ai.output.messages",
    "SERVER_ADDRESS": "server.address",
    "SERVER_PORT": "server.port",
    "ERROR_TYPE": "error.type",
    # HTTP server spans (stable)
    "HTTP_REQUEST_METHOD": "http.request.method",
    "HTTP_ROUTE": "http.route",
    "HTTP_RESPONSE_STATUS_CODE": "http.response.status_code",
    "URL_PATH": "url.path",
    "URL_SCHEME": "url.scheme",
    "CLIENT_ADDRESS": "client.address",
    "DB_SYSTEM_NAME": "db.system.name",
    "DB_OPERATION_NAME": "db.operation.name",
}


@pytest.mark.parametrize(("constant", "name"), sorted(CONVENTIONS.items()))
def test_pinned_names(constant: str, name: str) -> None:
    assert getattr(N, constant) == name


def test_operation_names_by_route() -> None:
    assert N.OPERATION == {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}


def test_provider_is_the_backend_kind() -> None:
    assert N.PROVIDER == {"vllm": "vllm", "kserve": "kserve", "openai": "openai"}


def test_the_deprecated_system_attribute_is_not_used() -> None:
    values = {v for k, v in vars(N).items() if k.isupper() and isinstance(v, str)}
    assert "gen_ai.system" not in values
    assert all(not v.startswith("gen_ai.") or v in CONVENTIONS.values() for v in values)
