"""Prometheus metrics for one server, on its own CollectorRegistry (no global state, so two
servers in one process, as in the tests, keep separate figures).

Request latencies are observed from the engine's own timestamps (RequestMetrics) as outputs
come out of the engine thread; engine gauges are read from the latest EngineStats snapshot at
scrape time, the attention pool's among them (0 without a pool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fapool.engine.llm_engine import EngineStats
from fapool.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TOKEN_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
)
REQUEST_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)


@dataclass
class _Progress:
    num_tokens: int = 0
    last_token_time: float | None = None
    started: bool = False


class ServerMetrics:
    """Also the AsyncEngine's observer: on_output / on_aborted / on_failed run on the engine
    thread; reject() runs on the event loop. prometheus_client metrics are thread-safe and
    _progress is touched by the engine thread only."""

    def __init__(self, model_name: str, stats_fn: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = {"registry": self.registry}
        self.finished = Counter(
            "fapool_request_finished", "Finished requests by finish reason", [*labels, "finish_reason"], **reg
        )
        self.rejected = Counter(
            "fapool_request_rejected",
            "Requests refused before admission, by reason",
            [*labels, "reason"],
            **reg,
        )
        self.prompt_tokens = Counter(
            "fapool_prompt_tokens", "Prompt tokens of started requests", labels, **reg
        )
        self.generation_tokens = Counter("fapool_generation_tokens", "Generated tokens", labels, **reg)
        self.ttft = Histogram(
            "fapool_time_to_first_token_seconds",
            "Time to first token from arrival",
            labels,
            buckets=TTFT_BUCKETS,
            **reg,
        )
        self.tpot = Histogram(
            "fapool_time_per_output_token_seconds",
            "Mean time per output token after the first",
            labels,
            buckets=TOKEN_BUCKETS,
            **reg,
        )
        self.itl = Histogram(
            "fapool_inter_token_latency_seconds",
            "Time between successive engine outputs",
            labels,
            buckets=TOKEN_BUCKETS,
            **reg,
        )
        self.queue_time = Histogram(
            "fapool_request_queue_time_seconds",
            "Arrival to first scheduled",
            labels,
            buckets=REQUEST_BUCKETS,
            **reg,
        )
        self.e2e = Histogram(
            "fapool_e2e_request_latency_seconds", "Arrival to finish", labels, buckets=REQUEST_BUCKETS, **reg
        )
        self.registry.register(_EngineCollector(model_name, stats_fn))
        self.model_name = model_name
        self._progress: dict[str, _Progress] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    # Observer ---------------------------------------------------------------------------------
    def on_output(self, out: RequestOutput) -> None:
        m, name = out.metrics, self.model_name
        p = self._progress.setdefault(out.request_id, _Progress())
        if not p.started:
            p.started = True
            self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
            if m.queue_time is not None:
                self.queue_time.labels(name).observe(m.queue_time)
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > p.num_tokens:
            self.generation_tokens.labels(name).inc(num_tokens - p.num_tokens)
            if p.num_tokens == 0 and m.ttft is not None:
                self.ttft.labels(name).observe(m.ttft)
            elif p.last_token_time is not None and m.last_token_time is not None:
                self.itl.labels(name).observe(m.last_token_time - p.last_token_time)
            p.num_tokens, p.last_token_time = num_tokens, m.last_token_time
        if out.finished:
            del self._progress[out.request_id]
            self.finished.labels(name, out.finish_reason or "error").inc()
            if m.finished_time is not None:
                self.e2e.labels(name).observe(m.finished_time - m.arrival_time)
            tpot = out.tpot
            if tpot is not None:
                self.tpot.labels(name).observe(tpot)

    def on_aborted(self, request_id: str) -> None:
        self._progress.pop(request_id, None)
        self.finished.labels(self.model_name, "abort").inc()

    def on_failed(self, request_id: str) -> None:
        self._progress.pop(request_id, None)
        self.finished.labels(self.model_name, "error").inc()


class _EngineCollector:
    """Gauges read from the engine's latest stats at scrape time."""

    def __init__(self, model_name: str, stats_fn: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self) -> Iterator[Metric]:
        s = self.stats_fn()
        name = [self.model_name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric(name, value)
            return g

        yield gauge("fapool_num_requests_running", "Requests in the running batch", s.num_running)
        yield gauge("fapool_num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting)
        yield gauge("fapool_kv_cache_usage_ratio", "Fraction of KV blocks in use", s.kv_usage)
        yield gauge("fapool_kv_cache_blocks_used", "KV blocks in use", s.kv_blocks_used)
        yield gauge("fapool_kv_cache_blocks_total", "KV blocks in the cache", s.kv_blocks_total)
        yield gauge("fapool_kv_cache_tokens_used", "Tokens whose KV is stored", s.kv_tokens_used)
        c = CounterMetricFamily(
            "fapool_num_preemptions", "Requests preempted (recomputed)", labels=["model_name"]
        )
        c.add_metric(name, s.num_preemptions)
        yield c
        c = CounterMetricFamily(
            "fapool_prefix_cache_hit_blocks", "Prefix-cache block hits", labels=["model_name"]
        )
        c.add_metric(name, s.prefix_cache_hit_blocks)
        yield c
        c = CounterMetricFamily(
            "fapool_prefix_cache_query_blocks", "Prefix-cache block lookups", labels=["model_name"]
        )
        c.add_metric(name, s.prefix_cache_query_blocks)
        yield c

        yield gauge("fapool_attention_pool_size", "Attention-pool workers in use", s.pool_size)
        yield gauge("fapool_attention_pool_live_workers", "Attention-pool worker processes alive", s.pool_live_workers)
        c = CounterMetricFamily(
            "fapool_attention_pool_workers_lost", "Attention-pool workers lost (their requests recomputed)",
            labels=["model_name"],
        )
        c.add_metric(name, s.pool_workers_lost)
        yield c
        for metric, doc, value in (
            ("fapool_attention_pool_worker_starts", "Elastic-pool workers started as the pool grew", s.pool_worker_starts),
            ("fapool_attention_pool_worker_stops", "Elastic-pool workers stopped once idle", s.pool_worker_stops),
            (
                "fapool_attention_pool_join_wait_seconds",
                "Seconds steps waited for elastic-pool workers to join (0 when started ahead)",
                s.pool_join_wait_s,
            ),
        ):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric(name, value)
            yield c
        if s.pool_join_seconds:
            yield gauge(
                "fapool_attention_pool_last_join_seconds", "Latency of the last elastic-pool worker start",
                s.pool_join_seconds[-1],
            )
        g = GaugeMetricFamily(
            "fapool_attention_pool_kv_tokens",
            "KV tokens held by each attention-pool worker",
            labels=["model_name", "worker"],
        )
        for worker, tokens in s.kv_tokens_per_worker.items():
            g.add_metric([self.model_name, str(worker)], tokens)
        yield g

