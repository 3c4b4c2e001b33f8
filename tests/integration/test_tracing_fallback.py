"""A model fallback shows in the trace: the routing span names the model that answered, the attempt
span carries it as the request model, and the SERVER span is still the client's request."""
from __future__ import annotations

from pathlib import Path

import openai

from tests.integration.test_tracing import _complete, _one, new_traceparent
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import free_port, start_gateway, start_redis, start_sim


def test_a_fallback_is_in_the_trace(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    redis = start_redis(tmp_path)
    sim_b = start_sim(tmp_path, "model-b", ["--profile", "tiny"])
    cfg = {"server": {"debug_headers": True},
           "backends": [{"name": "a-0", "url": f"http://127.0.0.1:{free_port()}", "models": ["model-a"]},
                        {"name": "b-0", "url": f"http://127.0.0.1:{sim_b.port}", "models": ["model-b"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "resilience": {"fallbacks": {"model-a": ["model-b"]}}}
    gw = start_gateway(tmp_path, cfg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                           "OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        header, trace_id, _ = new_traceparent()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="model-a", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_headers={"traceparent": header})
        assert raw.headers["x-gravity-fallback-model"] == "model-b"
        spans = receiver.wait_for(_complete, trace_id)
        route = _one(spans, name="gravity.route")
        assert route.attributes["gravity.route.fallback_model"] == "model-b"
        assert route.attributes["gravity.route.endpoint"] == "b-0"
        attempt = _one(spans, kind="CLIENT")
        assert attempt.attributes["gen_ai.request.model"] == "model-b"
        assert attempt.attributes["gen_ai.response.model"] == "model-b"
        assert _one(spans, kind="SERVER").trace_id == trace_id
    finally:
        for p in (gw, sim_b, redis):
            p.stop()
        receiver.close()
