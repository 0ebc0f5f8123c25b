"""The elastic attention pool on Ray (CPU, a local Ray instance): workers are actors started when
the pool grows onto them and stopped once idle; greedy tokens equal the single-process engine
through joins and leaves; a killed actor's requests are recomputed. Asserted on state (actor
counts, live processes), not on timing."""

import os
import time

import pytest
import ray

from fapool import LLM, SamplingParams
from fapool.config import ConfigError
from tiny_models import random_prompts

LENGTHS = [3, 10, 25, 40, 70]
POOL = dict(pool_threshold=32, tokens_per_pool_worker=16, worker_timeout_s=30.0)
PARAMS = SamplingParams(temperature=0.0, max_tokens=30)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _kw(**kw):
    # Workers start on demand unless a test asks for them ahead (pool_prestart_tokens).
    return dict(device="cpu", block_size=4, num_kv_blocks=256, **{"pool_prestart_tokens": 0, **kw})


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for every Ray test (conftest)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    folder = tiny_checkpoints["llama"][0]
    return [o.token_ids for o in LLM(folder, **_kw()).generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)]


# Prompts of 3, 10 and 25 tokens: local at first, they cross the threshold (32) while decoding.
CROSSING = random_prompts(LENGTHS, seed=21)[:3]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone(pids, within_s: float = 20.0) -> bool:
    """The processes have exited (Ray kills an actor asynchronously)."""
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _run(llm, prompts, params, on_step=lambda engine, step: None):
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    finished, step, live = {}, 0, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o.outputs[0].token_ids
        step += 1
        live.append(engine.stats().pool_live_workers)
        on_step(engine, step)
    return [finished[i] for i in ids], live


def test_ray_pool_grows_serves_and_releases(tiny_checkpoints, reference):
    folder = tiny_checkpoints["llama"][0]
    kw = _kw(attention_workers=2, distributed_executor="ray", pool_idle_timeout_s=0.0, **POOL)
    with LLM(folder, **kw) as llm:
        engine = llm.engine
        pool = engine.executor.runner.ray_pool
        assert engine.stats().pool_live_workers == 0  # nothing starts before the pool is needed
        got, live = _run(llm, CROSSING, PARAMS)
        assert got == reference[:3]
        # The pool grew past the threshold onto two actors, which joined mid-generation...
        assert live[0] == 0 and max(live) == 2
        reports = engine.executor.reports
        assert sum(w.q_rows for s in reports for w in s.workers.values()) > 0
        pids = sorted(pool.pids_seen)
        assert len(pids) == 2
        # ...and once no KV was left on them they were stopped, their processes gone.
        stats = engine.stats()
        assert stats.pool_live_workers == 0 and stats.pool_worker_starts == 2 and stats.pool_worker_stops == 2
        assert len(stats.pool_join_seconds) == 2 and all(s > 0 for s in stats.pool_join_seconds)
        assert stats.pool_join_wait_s > 0  # started on demand: the steps waited for them
        assert engine.pool_manager.active_workers() == set()
        assert _gone(pids)
        # A second long request starts them again.
        got, live = _run(llm, random_prompts(LENGTHS, seed=21)[-1:], PARAMS)
        assert got == reference[-1:]
        assert max(live) >= 1 and engine.stats().pool_worker_starts >= 3
        assert engine.stats().pool_live_workers == 0


def test_ray_pool_starts_workers_ahead_of_need(tiny_checkpoints, reference):
    """With pool_prestart_tokens, the workers the decoding sequences will reach are started
    between steps, before a step places KV on them: no step starts one itself, none is stopped
    while it is wanted soon (idle timeout 0), and the tokens are unchanged."""
    folder = tiny_checkpoints["llama"][0]
    kw = _kw(attention_workers=2, distributed_executor="ray", pool_idle_timeout_s=0.0, pool_prestart_tokens=24, **POOL)
    with LLM(folder, **kw) as llm:
        pool = llm.engine.executor.runner.ray_pool
        got, live = _run(llm, CROSSING, PARAMS)
        assert got == reference[:3]
        assert max(live) == 2 and live[-1] == 0
        stats = llm.engine.stats()
        assert pool.num_started_on_demand == 0
        assert stats.pool_worker_starts == 2 and stats.pool_worker_stops == 2


def test_bench_pool_records_the_pool_size_over_time(tiny_checkpoints):
    """`fapool bench pool`'s series: workers holding KV and live actors after each step."""
    from fapool.bench.pool_bench import PoolSizes

    folder = tiny_checkpoints["llama"][0]
    kw = _kw(attention_workers=2, distributed_executor="ray", pool_idle_timeout_s=0.0, **POOL)
    with LLM(folder, **kw) as llm:
        sizes = PoolSizes(llm.engine)
        _run(llm, CROSSING, PARAMS, lambda engine, step: sizes.record())
        llm.engine.resize_pool()
        sizes.record()
    assert sizes.series["live"][0] == 0 and max(sizes.series["live"]) == 2 and sizes.series["live"][-1] == 0
    assert max(sizes.series["with_kv"]) == 2
    # Grows with the sequences' length, one actor at a time, then back to none.
    runs = [r.split(" x")[0] for r in sizes.describe().split(", ")]
    assert runs == ["0/0", "1/1", "2/2", "0/0"]


def test_bench_pool_runs_the_reference_first_and_again_last():
    """`fapool bench pool`'s rows: the single process first (every ratio's reference) and once
    more at the end, so a machine that drifted during the run shows in the ratio of the two."""
    import argparse

    from fapool.bench.pool_bench import _configs, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    names = [n for n, _ in _configs(parser.parse_args(["pool", "--pool-modes", "--lamina-modes", "shard"]))]
    assert names[0] == "single process" and names[-1] == "single process, again"
    assert any(n.startswith("Lamina") for n in names)
    only = [n for n, _ in _configs(parser.parse_args(["pool", "--pool-modes"]))]
    assert only == ["single process"]


def test_killed_ray_actor_requests_are_recomputed(tiny_checkpoints, reference):
    folder = tiny_checkpoints["llama"][0]
    kw = _kw(attention_workers=2, distributed_executor="ray", pool_idle_timeout_s=None, **POOL)
    with LLM(folder, **kw) as llm:
        pool = llm.engine.executor.runner.ray_pool
        killed = []

        def kill(engine, step):
            if not killed and 1 in pool.live and step >= 12:
                ray.kill(pool.live[1].actor, no_restart=True)
                killed.append(step)

        got, _ = _run(llm, random_prompts(LENGTHS, seed=21), PARAMS, kill)
        assert killed
        assert [w for w, _ in llm.engine.worker_failures] == [1]
        assert got == reference
        assert llm.engine.stats().pool_workers_lost == 1


def test_ray_pool_beside_tensor_parallel_ranks(tiny_checkpoints, reference):
    """TP 2 dense ranks (the second a Ray actor too, ray_ranks) + two Ray attention actors: the
    driver gathers its TP ranks' heads for the pool, so the actors' pair groups are with the
    driver only."""
    from fapool.worker.ray_ranks import RayRank

    folder = tiny_checkpoints["llama"][0]
    kw = _kw(attention_workers=2, tensor_parallel_size=2, distributed_executor="ray", pool_idle_timeout_s=0.0, **POOL)
    with LLM(folder, **kw) as llm:
        assert isinstance(llm.engine.executor.runner.workers.procs[1], RayRank)
        got, live = _run(llm, CROSSING, PARAMS)
        assert got == reference[:3]
        assert live[0] == 0 and max(live) == 2
        assert llm.engine.stats().pool_live_workers == 0


def test_ray_pool_beside_pipeline_stages(tiny_checkpoints, reference):
    """PP 2 (stage 1 a Ray actor, ray_ranks) + two elastic Ray attention actors: each stage's
    leader exchanges with the pool for its own layers, so a joining worker makes a pair group
    with the driver and one with the stage-1 leader. The pool grows mid-generation, shrinks to
    none, and grows again (new pair groups on both stages), with the tokens unchanged."""
    from fapool.worker.ray_ranks import RayRank

    folder = tiny_checkpoints["llama"][0]
    ray_pp2 = dict(attention_workers=2, pipeline_parallel_size=2, distributed_executor="ray")
    kw = _kw(**ray_pp2, pool_idle_timeout_s=0.0, **POOL)
    with LLM(folder, **kw) as llm:
        engine = llm.engine
        runner = engine.executor.runner
        pool = runner.ray_pool
        assert isinstance(runner.workers.procs[1], RayRank) and pool.leaders == [1]
        got, live = _run(llm, CROSSING, PARAMS)
        assert got == reference[:3]
        assert live[0] == 0 and max(live) == 2
        # Both actors attended, for the layers of both stages: a stage-1 leader that never sent
        # would leave its worker waiting, and the step would fail the worker.
        reports = engine.executor.reports
        assert all(sum(s.workers[w].q_rows for s in reports if w in s.workers) > 0 for w in (1, 2))
        assert sum(s.ranks[1].comm_s for s in reports) > 0
        assert engine.worker_failures == [] and runner.link.failed == {}
        stats = engine.stats()
        assert stats.pool_live_workers == 0 and stats.pool_worker_starts == 2 and stats.pool_worker_stops == 2
        assert _gone(sorted(pool.pids_seen))
        # A second long request starts them again, with new pair groups on both stages.
        got, live = _run(llm, random_prompts(LENGTHS, seed=21)[-1:], PARAMS)
        assert got == reference[-1:]
        assert max(live) >= 1 and engine.stats().pool_worker_starts >= 3
        assert engine.worker_failures == []


def test_killed_ray_actor_beside_pipeline_stages_requests_are_recomputed(tiny_checkpoints, reference):
    """PP 2: an actor serving both stages' pool segments is killed between steps; the next step's
    exchanges with it fail on both stages (the stage-1 leader reports it to the driver), its
    requests are recomputed, and the other actor keeps serving both stages."""
    folder = tiny_checkpoints["llama"][0]
    ray_pp2 = dict(attention_workers=2, pipeline_parallel_size=2, distributed_executor="ray")
    kw = _kw(**ray_pp2, pool_idle_timeout_s=None, **POOL)
    with LLM(folder, **kw) as llm:
        engine = llm.engine
        pool = engine.executor.runner.ray_pool
        killed = []

        def kill(engine, step):
            if not killed and {1, 2} <= pool.live.keys() and step >= 12:
                ray.kill(pool.live[1].actor, no_restart=True)
                killed.append((step, pool.live[1].pid, len(engine.executor.reports)))

        got, live = _run(llm, random_prompts(LENGTHS, seed=21), PARAMS, kill)
        assert killed
        step, pid, before = killed[0]
        assert got == reference
        assert [w for w, _ in engine.worker_failures] == [1] and engine.stats().pool_workers_lost == 1
        assert 1 not in pool.live and live[step] == 1 and _gone([pid])
        assert 1 in engine.executor.reports[before].ranks[1].failed_workers  # seen by the stage-1 leader
        # The survivor served the steps after the kill, for the layers of both stages.
        assert sum(s.workers[2].q_rows for s in engine.executor.reports[before + 1 :] if 2 in s.workers) > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attention_workers=0), "distributed_executor 'ray'"),
        (dict(attention_workers=1, afd_attention_ranks=1, afd_ffn_ranks=1), "attention_workers"),
        (dict(attention_workers=1, pool_idle_timeout_s=-1.0), "pool_idle_timeout_s"),
    ],
)
def test_ray_configurations_that_cannot_run(tiny_checkpoints, kw, match):
    with pytest.raises(ConfigError, match=match):
        LLM(tiny_checkpoints["llama"][0], device="cpu", distributed_executor="ray", **kw)


def test_unreachable_ray_address_is_a_config_error(tiny_checkpoints):
    """Checked before ray.init (which would retry forever); Ray is not started."""
    ray.shutdown()  # the module's local instance: the engine only dials an address when none runs
    try:
        with pytest.raises(ConfigError, match="ray_address '127.0.0.1:9'"):
            LLM(tiny_checkpoints["llama"][0], device="cpu", attention_workers=1, distributed_executor="ray",
                ray_address="127.0.0.1:9")
        assert not ray.is_initialized()
    finally:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
