"""Prometheus metrics of `engine serve` (GET /metrics), in a registry of the app's own.

Engine state (running and waiting requests, KV-cache usage, token, preemption and prefix-cache
counters, and speculative decoding's when it is on) is read from the engine when scraped;
per-request latencies (TTFT, inter-token, end-to-end, queue time) and finish reasons are
observed as each request ends.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

PREFIX = "llm_engine_"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        sched, blocks = e.scheduler, e.blocks
        info = getattr(e, "backend_info", None)
        if info:
            yield InfoMetricFamily(PREFIX + "backend", "The step backend and what it chose "
                                   "on this machine (threads, CPU, ISA).", value=info)
        total = e.kv_spec.num_blocks
        yield GaugeMetricFamily(PREFIX + "requests_running", "Requests in the running batch.",
                                value=len(sched.running))
        yield GaugeMetricFamily(PREFIX + "requests_waiting", "Requests waiting to be scheduled.",
                                value=len(sched.waiting))
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio",
                                "Share of KV-cache blocks held by requests (0..1).",
                                value=(total - blocks.num_free_blocks) / total if total else 0)
        yield GaugeMetricFamily(PREFIX + "kv_cache_blocks", "KV-cache blocks in all.",
                                value=total)
        for name, doc, value in (
                ("prompt_tokens", "Prompt tokens received.", e.stats["prompt_tokens"]),
                ("generation_tokens", "Tokens generated.", e.stats["generated_tokens"]),
                ("preemptions", "Requests preempted for KV-cache space.",
                 sched.num_preemptions),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 blocks.stats.queries),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 blocks.stats.hits)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield from _speculation(getattr(e, "speculator", None))


def _speculation(speculator: Any):
    """Speculative decoding's series, only when it is on: a dashboard tells 'off' from
    'nothing accepted yet' by their absence."""
    if speculator is None:
        return
    s = speculator.stats
    yield CounterMetricFamily(PREFIX + "spec_proposed_tokens",
                              "Drafted tokens sent to verification.", value=s.proposed)
    yield CounterMetricFamily(PREFIX + "spec_accepted_tokens",
                              "Drafted tokens verification kept.", value=s.accepted)
    yield GaugeMetricFamily(PREFIX + "spec_acceptance_rate",
                            "Accepted over proposed drafted tokens since start (0..1).",
                            value=s.acceptance_rate)
    yield GaugeMetricFamily(PREFIX + "spec_mean_accepted_length",
                            "Tokens per verified request-step since start (1 + accepted "
                            "drafts).", value=s.mean_accepted_length)


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = hist("inter_token_latency_seconds",
                        "Mean gap between a request's output tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.")
        self.finished = Counter(PREFIX + "requests", "Finished requests (choices) by reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter(PREFIX + "requests_rejected",
                                "Requests refused before queueing, by HTTP status.",
                                ["status"], registry=r)
        r.register(_EngineCollector(engine))

    def observe(self, timings: list[dict[str, Any]], finish_reasons: list[str]) -> None:
        for m in timings:
            arrival, first, finish = m.get("arrival"), m.get("first_token"), m.get("finish")
            if arrival is None:
                continue
            if first is not None:
                self.ttft.observe(first - arrival)
            if finish is not None:
                self.e2e.observe(finish - arrival)
                n = m.get("tokens") or 0
                if first is not None and n > 1:
                    self.itl.observe((finish - first) / (n - 1))
            if m.get("first_scheduled") is not None:
                self.queue.observe(m["first_scheduled"] - arrival)
        for reason in finish_reasons:
            self.finished.labels(reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
