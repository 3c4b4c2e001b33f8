"""Prometheus exposition of engine stats under vLLM's current metric names and labels.

A collector reads a fresh engine snapshot at scrape time; each app owns its own registry.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from simulator.runner import EngineRunner
from simulator.stats import Histogram

LABELS = ["model_name", "engine"]


class SimCollector(Collector):
    def __init__(self, runner: Callable[[], EngineRunner], model_name: str, max_loras: int) -> None:
        self._runner = runner
        self._model = model_name
        self._max_loras = max_loras

    def collect(self) -> Iterator[Metric]:
        runner = self._runner()
        engine = runner.engine
        st = engine.stats()
        lv = [self._model, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(lv, value)
            return c

        def hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
            m = HistogramMetricFamily(name, doc, labels=LABELS)
            m.add_metric(lv, buckets=h.cumulative(), sum_value=h.total)
            return m

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    st.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", st.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      st.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      st.prefix_cache_hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      st.generation_tokens_total)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      st.num_preemptions_total)
        yield hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", st.ttft)
        yield hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", st.itl)
        yield hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", st.e2e)

        cfg = engine.config
        info = {"block_size": str(cfg.block_size), "num_gpu_blocks": str(cfg.kv_blocks), "num_cpu_blocks": "0",
                "enable_prefix_caching": str(cfg.enable_prefix_caching), "cache_dtype": "auto",
                "gpu_memory_utilization": "0.9", "engine": "0"}
        cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=list(info))
        cache.add_metric(list(info.values()), 1.0)
        yield cache

        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        lora.add_metric([str(self._max_loras), ",".join(st.waiting_loras), ",".join(st.running_loras)],
                        time.time())
        yield lora

        yield GaugeMetricFamily("process_start_time_seconds",
                                "Start time of the process since unix epoch in seconds; moves on /admin/reset.",
                                value=runner.started_at)
        yield CounterMetricFamily("gravity_sim_restarts", "Simulated engine restarts via /admin/reset.",
                                  value=runner.restarts)


def build_registry(runner: Callable[[], EngineRunner], model_name: str, max_loras: int) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SimCollector(runner, model_name, max_loras))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
