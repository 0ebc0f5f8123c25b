"""Engine gauges come from the stats snapshot at scrape time; attention-pool figures appear as
soon as the engine's stats carry them."""

import dataclasses

from prometheus_client.parser import text_string_to_metric_families

from fapool.engine.llm_engine import EngineStats
from fapool.entrypoints.metrics import ServerMetrics

STATS = EngineStats(
    num_running=3,
    num_waiting=2,
    kv_blocks_used=10,
    kv_blocks_total=40,
    kv_tokens_used=150,
    block_size=16,
    num_preemptions=4,
    prefix_cache_hit_blocks=5,
    prefix_cache_query_blocks=9,
)


def _samples(metrics: ServerMetrics) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
    }


def test_engine_gauges_without_pool():
    samples = _samples(ServerMetrics("m", lambda: STATS))
    label = (("model_name", "m"),)
    assert samples[("fapool_num_requests_running", label)] == 3
    assert samples[("fapool_num_requests_waiting", label)] == 2
    assert samples[("fapool_kv_cache_usage_ratio", label)] == 0.25
    assert samples[("fapool_num_preemptions_total", label)] == 4
    assert samples[("fapool_attention_pool_size", label)] == 0
    assert not any(name == "fapool_attention_pool_kv_tokens" for name, _ in samples)


def test_pool_figures_light_up():
    stats = dataclasses.replace(
        STATS, pool_size=2, pool_live_workers=3, pool_workers_lost=1, kv_tokens_per_worker={1: 640, 2: 512},
        pool_worker_starts=4, pool_worker_stops=1, pool_join_seconds=[2.5, 1.5], pool_join_wait_s=0.75,
    )
    samples = _samples(ServerMetrics("m", lambda: stats))
    assert samples[("fapool_attention_pool_size", (("model_name", "m"),))] == 2
    assert samples[("fapool_attention_pool_live_workers", (("model_name", "m"),))] == 3
    assert samples[("fapool_attention_pool_workers_lost_total", (("model_name", "m"),))] == 1
    assert samples[("fapool_attention_pool_worker_starts_total", (("model_name", "m"),))] == 4
    assert samples[("fapool_attention_pool_worker_stops_total", (("model_name", "m"),))] == 1
    assert samples[("fapool_attention_pool_last_join_seconds", (("model_name", "m"),))] == 1.5
    assert samples[("fapool_attention_pool_join_wait_seconds_total", (("model_name", "m"),))] == 0.75
    assert samples[("fapool_attention_pool_kv_tokens", (("model_name", "m"), ("worker", "1")))] == 640
    assert samples[("fapool_attention_pool_kv_tokens", (("model_name", "m"), ("worker", "2")))] == 512
