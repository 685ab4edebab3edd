"""Prometheus metrics, one registry per app (no module-level globals): request counts, TTFT, inter-token latency,
end-to-end latency, tokens, and engine gauges (running, waiting, cache usage) read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        drafts, accepted, verifies = s.spec_draft_tokens_total, s.spec_accepted_tokens_total, s.spec_verify_steps_total
        yield CounterMetricFamily("small4_spec_draft_tokens", "speculative draft tokens verified", value=drafts)
        yield CounterMetricFamily("small4_spec_accepted_tokens", "speculative draft tokens accepted", value=accepted)
        yield CounterMetricFamily("small4_spec_verify_steps", "sequence-steps that verified drafts", value=verifies)
        yield GaugeMetricFamily(
            "small4_spec_acceptance_rate", "accepted / verified draft tokens", value=accepted / drafts if drafts else 0
        )
        yield GaugeMetricFamily(
            "small4_spec_mean_accepted_length",
            "tokens emitted per verifying sequence-step (accepted drafts + 1)",
            value=(accepted + verifies) / verifies if verifies else 0,
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
        self.spec_step_length = Histogram(
            "small4_spec_accepted_length_per_step",
            "tokens one sequence emitted in a verifying step (accepted drafts + 1)",
            buckets=tuple(range(1, 18)),
            registry=r,
        )
        self.spec_request_acceptance = Histogram(
            "small4_spec_request_acceptance_rate",
            "per finished sequence that speculated: accepted / verified draft tokens",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.spec_request_length = Histogram(
            "small4_spec_request_mean_accepted_length",
            "per finished sequence that speculated: tokens per verifying step",
            buckets=tuple(range(1, 18)),
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def observe_speculation(self, out) -> None:
        """Per-step and per-sequence speculation figures from one engine output (a ``RequestOutput``)."""
        if out.num_accepted_this_step is not None:
            self.spec_step_length.observe(out.num_accepted_this_step + 1)
        if out.finished and out.num_verify_steps:
            self.spec_request_acceptance.observe(out.num_accepted_draft_tokens / max(out.num_draft_tokens, 1))
            self.spec_request_length.observe(
                (out.num_accepted_draft_tokens + out.num_verify_steps) / out.num_verify_steps
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
