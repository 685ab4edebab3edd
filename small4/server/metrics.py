"""Prometheus metrics, one registry per app (no module-level globals): request counts, TTFT, inter-token latency,
end-to-end latency, tokens, and engine gauges (running, waiting, cache usage) read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from small4.engine import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("small4_num_requests_running", "sequences in the running batch", value=s.num_running)
        yield GaugeMetricFamily("small4_num_requests_waiting", "sequences waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily(
            "small4_kv_cache_usage", "fraction of latent-cache blocks in use", value=s.kv_cache_usage
        )
        yield GaugeMetricFamily(
            "small4_prefix_cache_hit_rate", "prefix-cache hits / queries (tokens)", value=s.prefix_cache_hit_rate
        )


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("small4_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.ttft = Histogram(
            "small4_time_to_first_token_seconds",
            "time to first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "small4_inter_token_latency_seconds",
            "time between streamed tokens",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "small4_e2e_request_latency_seconds", "request latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("small4_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("small4_generation_tokens", "generated tokens", registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
