"""Every span and attribute name the gateway emits, pinned in one place.

The GenAI names follow the semantic conventions' `gen_ai.client.inference` span (status: Development,
in the semantic-conventions-genai repository); a rename there is one edit here and a failing test
(tests/unit/gateway/telemetry/test_names.py). The `gravity.*` names are the gateway's own.
"""
from __future__ import annotations

# -- GenAI inference span (gen-ai client inference) ---------------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID = "gen_ai.request.previous_response.id"
# Opt-in only (telemetry.capture_content / OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT).
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"

SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# -- HTTP server span (stable HTTP conventions) ---------------------------------------------------------
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
CLIENT_ADDRESS = "client.address"

# -- Redis (state store) --------------------------------------------------------------------------------
DB_SYSTEM_NAME = "db.system.name"
DB_OPERATION_NAME = "db.operation.name"

# -- the gateway's own ------------------------------------------------------------------------------------
REQUEST_ID = "gravity.request_id"
TENANT = "gravity.tenant"
PRIORITY = "gravity.priority"
OUTCOME = "gravity.outcome"
ATTEMPTS = "gravity.attempts"
AUTH_RESULT = "gravity.auth.result"
RATELIMIT_DECISION = "gravity.ratelimit.decision"
"""allowed | rejected | unlimited (no budget applies)."""
RATELIMIT_SCOPES = "gravity.ratelimit.scopes"
RATELIMIT_BOUND_SCOPE = "gravity.ratelimit.bound_scope"
"""The scope whose budget refused the request (key, tenant, tenant model), or the tightest one."""
RATELIMIT_KIND = "gravity.ratelimit.kind"
RATELIMIT_RESERVED_TOKENS = "gravity.ratelimit.reserved_tokens"
RATELIMIT_REMAINING_TOKENS = "gravity.ratelimit.remaining_tokens"
RATELIMIT_REMAINING_REQUESTS = "gravity.ratelimit.remaining_requests"
RATELIMIT_WHERE = "gravity.ratelimit.where"
ROUTE_PROFILE = "gravity.route.profile"
ROUTE_CANDIDATES = "gravity.route.candidates"
ROUTE_CANDIDATE_SCORES = "gravity.route.candidate_scores"
ROUTE_ENDPOINT = "gravity.route.endpoint"
ROUTE_SCORE_PREFIX = "gravity.route.score."
"""One attribute per scorer: that scorer's clamped, unweighted score of the chosen endpoint."""
ROUTE_PREFIX_MATCH_RATIO = "gravity.route.prefix_match_ratio"
ROUTE_SESSION_HIT = "gravity.route.session_hit"
ROUTE_FALLBACK_MODEL = "gravity.route.fallback_model"
ROUTE_LATENCY = "gravity.route.latency_s"
ATTEMPT_NUMBER = "gravity.attempt.number"
ATTEMPT_KIND = "gravity.attempt.kind"
"""first | retry | resume."""
ATTEMPT_ENDPOINT = "gravity.attempt.endpoint"
ATTEMPT_FAILURE = "gravity.attempt.failure"
STATE_OPERATION = "gravity.state.operation"

# -- span names ---------------------------------------------------------------------------------------------
SPAN_AUTH = "gravity.auth"
SPAN_RATE_LIMIT = "gravity.rate_limit"
SPAN_ROUTE = "gravity.route"
SPAN_STATE_PREFIX = "gravity.state "
"""`gravity.state {operation}`, e.g. `gravity.state history`."""

# -- values -----------------------------------------------------------------------------------------------
OPERATION = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""gen_ai.operation.name by OpenAI route."""
PROVIDER = {"vllm": "vllm", "kserve": "kserve", "openai": "openai"}
"""gen_ai.provider.name by backend kind: the conventions register no value for self-hosted engines, so
the gateway reports what the backend is (docs/tracing.md)."""
