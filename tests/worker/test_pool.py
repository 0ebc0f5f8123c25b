"""The attention pool across processes (gloo on CPU): greedy tokens equal the single-process
engine for every mode, sequences crossing the threshold mid-decode, pool growth and release,
and dead or hung workers."""

import time

import pytest

from fapool import LLM, SamplingParams
from fapool.worker.comm import TRACE_ENV
from p2p_order import assert_pairs_mirror
from tiny_models import random_prompts

# Threshold 32 with block size 4: prompts of 3, 10 and 25 tokens cross it while decoding 30
# tokens; 40 and 70 start past it; tokens_per_pool_worker 16 makes long ones span workers.
LENGTHS = [3, 10, 25, 40, 70]
POOL = dict(pool_threshold=32, tokens_per_pool_worker=16, worker_timeout_s=20.0)
PARAMS = SamplingParams(temperature=0.0, max_tokens=30)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _engine_kwargs(**kw):
    return dict(device="cpu", block_size=4, num_kv_blocks=256, **kw)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """Single-process greedy tokens per architecture (and a chunked-prefill variant)."""
    cache = {}

    def get(arch, lengths=tuple(LENGTHS), **kw):
        key = (arch, lengths, tuple(sorted(kw.items())))
        if key not in cache:
            llm = LLM(tiny_checkpoints[arch][0], **_engine_kwargs(**kw))
            cache[key] = [o.token_ids for o in llm.generate(_ids(random_prompts(list(lengths), seed=21)), PARAMS)]
        return cache[key]

    return get


@pytest.mark.parametrize(
    "arch,mode,workers",
    [
        ("llama", "shard", 1),
        ("llama", "shard", 2),
        ("llama", "shard", 3),
        ("llama", "replicate", 2),
        ("llama", "head", 2),
        ("qwen2", "shard", 2),
        ("mistral", "head", 2),
    ],
)
def test_pool_matches_single_process(tiny_checkpoints, reference, arch, mode, workers, tmp_path, monkeypatch):
    folder = tiny_checkpoints[arch][0]
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    with LLM(folder, **_engine_kwargs(attention_workers=workers, pool_mode=mode, **POOL)) as llm:
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        stats = llm.engine.executor.reports
        assert [o.token_ids for o in outs] == reference(arch)
        # The pool really served attention: workers answered queries, and were released.
        assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
        assert max(s.pool_size for s in stats) == workers
        assert llm.engine.pool_manager.active_workers() == set()
        assert all(p.num_used_blocks == 0 for p in llm.engine.pool_manager.pools.values())
    # What NCCL needs on GPUs: every pair of ranks posts its transfers in mirrored order.
    assert assert_pairs_mirror(str(tmp_path), 1 + workers) > 0


@pytest.mark.parametrize("mode", ["shard", "head"])
def test_lamina_all_attention_remote_matches_single_process(tiny_checkpoints, reference, mode):
    """Seed 004's topology: pool_threshold 0 puts every token's KV on the attention workers
    (request-level with shard, head-level with head); the dense rank holds a single unused block."""
    kw = _engine_kwargs(attention_workers=2, pool_mode=mode, **{**POOL, "pool_threshold": 0})
    with LLM(tiny_checkpoints["llama"][0], **kw) as llm:
        assert llm.engine.stats().kv_blocks_total == 1
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        assert [o.token_ids for o in outs] == reference("llama")
        stats = llm.engine.executor.reports
        assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
        assert max(s.pool_size for s in stats) == 2
        # No KV on the dense rank: it stores, attends and merges nothing of its own.
        assert all(s.local_attention_s == 0.0 for s in stats)


@pytest.mark.parametrize("mode", ["shard", "head"])
def test_pool_with_async_scheduling_matches_single_process(tiny_checkpoints, reference, mode):
    """Async scheduling with the pool: steps run on the runner's thread while the engine
    schedules the next (micro-batch counts still chosen per step); greedy tokens unchanged."""
    kw = _engine_kwargs(attention_workers=2, pool_mode=mode, async_scheduling=True, **POOL)
    with LLM(tiny_checkpoints["llama"][0], **kw) as llm:
        assert llm.engine.async_scheduling
        launched = []
        launch = llm.engine.executor.launch
        llm.engine.executor.launch = lambda sched: (launched.append(1), launch(sched))[1]
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        assert [o.token_ids for o in outs] == reference("llama")
        assert len(launched) > 5
        assert sum(w.q_rows for s in llm.engine.executor.reports for w in s.workers.values()) > 0


def test_prefix_shared_within_a_step_across_micro_batches(tiny_checkpoints):
    """Prompts sharing a prefix, admitted in one step: the later one reuses blocks the earlier
    one writes in that very step, from another micro-batch (a bug while micro-batches did
    not advance layer by layer)."""
    folder = tiny_checkpoints["llama"][0]
    prompts = [list(range(3, 3 + n)) for n in (10, 40, 25)]
    single = LLM(folder, **_engine_kwargs())
    want = [o.token_ids for o in single.generate(_ids(prompts), PARAMS)]
    with LLM(folder, **_engine_kwargs(attention_workers=2, micro_batches=2, **POOL)) as llm:
        outs = llm.generate(_ids(prompts), PARAMS)
        assert outs[2].metrics.num_cached_tokens > 0
    assert [o.token_ids for o in outs] == want


def test_pool_with_chunked_prefill_and_one_micro_batch(tiny_checkpoints, reference):
    folder = tiny_checkpoints["llama"][0]
    want = reference("llama", max_num_batched_tokens=24)
    kw = _engine_kwargs(attention_workers=2, max_num_batched_tokens=24, micro_batches=1, **POOL)
    with LLM(folder, **kw) as llm:
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
    assert [o.token_ids for o in outs] == want


def test_pool_grows_with_length_and_is_released(tiny_checkpoints):
    """One request: local up to 32 tokens, then a new worker per 16 tokens up to 3."""
    folder = tiny_checkpoints["llama"][0]
    with LLM(folder, **_engine_kwargs(attention_workers=3, **POOL)) as llm:
        llm.generate(_ids(random_prompts([20], seed=2)), SamplingParams(temperature=0.0, max_tokens=70))
        history = llm.engine.pool_manager.history
        sizes = [len(e.workers) for e in history if e.action == "grow"]
        assert sizes == [1, 2, 3]
        assert len(set(history[-2].workers)) == 3
        assert history[-1].action == "release"
        # Growth happened at the segment boundaries: positions 32, 48 and 64.
        steps = [e.step for e in history if e.action == "grow"]
        assert steps[1] - steps[0] == 16 and steps[2] - steps[1] == 16
        # 90 tokens: positions 32..89 in segments of 16, 16, 16 and 10 (3 blocks); the fourth
        # goes to the least loaded worker. Blocks are counted whole (4 tokens).
        last = llm.engine.executor.reports[-1].kv_tokens_per_worker
        assert sorted(last.values()) == [16, 16, 28]


def test_parallel_sampling_copies_pool_blocks_on_write(tiny_checkpoints):
    """n = 2 with a prompt whose tail block lives on a pool worker: siblings copy it."""
    folder = tiny_checkpoints["llama"][0]
    prompt = random_prompts([38], seed=3)  # 38 > 32, tail block (36..39) partial, on the pool
    base = dict(temperature=0.8, max_tokens=12)
    single = LLM(folder, **_engine_kwargs())
    want = [single.generate(_ids(prompt), SamplingParams(seed=7 + i, **base))[0].token_ids for i in range(2)]
    with LLM(folder, **_engine_kwargs(attention_workers=2, **POOL)) as llm:
        out = llm.generate(_ids(prompt), SamplingParams(n=2, seed=7, **base))[0]
        assert [c.token_ids for c in out.outputs] == want


def test_preemption_with_the_pool(tiny_checkpoints, reference):
    folder = tiny_checkpoints["llama"][0]
    kw = _engine_kwargs(attention_workers=2, worker_kv_blocks=12, enable_prefix_caching=False, **POOL)
    with LLM(folder, **kw) as llm:
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == reference("llama")


def _run_until(llm, prompts, params, on_step):
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    finished, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
        steps += 1
        on_step(steps)
    return [finished[k].token_ids for k in sorted(finished, key=int)]


# One dense rank; two pipeline stages (each exchanges with the pool); two TP ranks (the driver
# exchanges for both); one dense rank under async scheduling (the step after the failed one
# is already running when the loss is seen: its tokens of the lost requests are dropped too).
DENSE_SHAPES = [dict(), dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2), dict(async_scheduling=True)]
DENSE_IDS = ["1", "pp2", "tp2", "1-async"]


@pytest.mark.parametrize("dense", DENSE_SHAPES, ids=DENSE_IDS)
def test_dead_worker_is_detected_and_its_requests_recomputed(tiny_checkpoints, reference, dense):
    folder = tiny_checkpoints["llama"][0]
    with LLM(folder, **_engine_kwargs(attention_workers=2, **dense, **POOL)) as llm:
        runner = llm.engine.executor.runner

        def kill(step):
            if step == 5:
                runner.workers.procs[runner.topology.attention_rank(1)].kill()

        assert llm.engine.stats().pool_live_workers == 2
        got = _run_until(llm, random_prompts(LENGTHS, seed=21), PARAMS, kill)
        assert [w for w, _ in llm.engine.worker_failures] == [1]
        stats = llm.engine.stats()
        assert stats.pool_live_workers == 1 and stats.pool_workers_lost == 1
        why = llm.engine.worker_failures[0][1]
        assert f"rank {runner.topology.attention_rank(1)}" in why or "exited" in why
        assert llm.engine.pool_manager.alive == {2}
        assert got == reference("llama")


@pytest.mark.parametrize("dense", DENSE_SHAPES, ids=DENSE_IDS)
def test_hung_worker_times_out_and_its_requests_are_recomputed(tiny_checkpoints, reference, dense):
    folder = tiny_checkpoints["llama"][0]
    kw = _engine_kwargs(attention_workers=2, **dense, **{**POOL, "worker_timeout_s": 2.0})
    with LLM(folder, **kw) as llm:
        runner = llm.engine.executor.runner
        started = {}

        def hang(step):
            if step == 4:
                runner.worker_fault_hang[2] = 60.0  # worker 2 stalls on its next step
                started["t"] = time.monotonic()

        got = _run_until(llm, random_prompts(LENGTHS, seed=21), PARAMS, hang)
        assert [w for w, _ in llm.engine.worker_failures] == [2]
        assert "no answer within 2 s" in llm.engine.worker_failures[0][1]
        assert got == reference("llama")
        runner.workers.procs[runner.topology.attention_rank(2)].kill()  # don't wait out its sleep


def test_head_placement_weighs_heads_by_sparse_budgets(tiny_checkpoints, tmp_path):
    """Head mode with a sparse profile: LPT places heads by their budgets (seed 003), so the
    one expensive head gets a worker to itself."""
    from fapool.sparse.profile import SparseProfile

    folder = tiny_checkpoints["mistral"][0]  # 4 KV heads, 2 layers
    profile = SparseProfile(
        model="tiny-mistral", block_size=4, target_recall=0.95, min_blocks=1, num_layers=2, num_heads=4,
        num_kv_heads=4, kv_budget=[[1.0, 0.1, 0.1, 0.1]] * 2,
    )
    path = str(tmp_path / "profile.json")
    profile.save(path)
    kw = _engine_kwargs(attention_workers=2, pool_mode="head", head_placement="lpt", **POOL)
    with LLM(folder, **{**kw, "sparse_attention": path}) as llm:
        assert llm.engine.executor.runner.pool_kv_heads == {1: [0], 2: [1, 2, 3]}
    with LLM(folder, **kw) as llm:  # no profile: equal weights, two heads each
        assert sorted(map(len, llm.engine.executor.runner.pool_kv_heads.values())) == [2, 2]



@pytest.mark.parametrize(
    "mode,workers,lengths,min_context",
    [
        ("shard", 2, LENGTHS, 0),
        ("head", 2, LENGTHS, 0),
        ("replicate", 2, LENGTHS, 0),
        # The step's longest KV reaches 60 mid-decode (40 + 20): the gate opens then.
        ("shard", 3, [10, 25, 40], 60),
    ],
)
def test_sparse_decode_inside_the_pool_matches_single_process_sparse(
    tiny_checkpoints, tmp_path, mode, workers, lengths, min_context
):
    """Sparse decode with the attention pool: the driver selects each row's blocks over all
    holders and every holder attends the chosen blocks it stores, so greedy tokens equal the
    single-process sparse engine's with the same profile (and differ from dense decode)."""
    from fapool.sparse.profile import SparseProfile

    folder = tiny_checkpoints["mistral"][0]  # 4 KV heads, 2 layers
    profile = SparseProfile(
        model="tiny-mistral", block_size=4, target_recall=0.95, min_blocks=2, num_layers=2, num_heads=4,
        num_kv_heads=4, kv_budget=[[0.6, 0.2, 0.3, 0.15], [0.25, 0.5, 0.2, 0.35]],
    )
    path = str(tmp_path / "profile.json")
    profile.save(path)
    prompts = _ids(random_prompts(lengths, seed=21))
    sparse = dict(sparse_attention=path, sparse_min_context=min_context)
    dense = [o.token_ids for o in LLM(folder, **_engine_kwargs()).generate(prompts, PARAMS)]
    want = [o.token_ids for o in LLM(folder, **_engine_kwargs(**sparse)).generate(prompts, PARAMS)]
    assert want != dense  # the profile's budgets change the tokens: the comparison below bites
    kw = _engine_kwargs(attention_workers=workers, pool_mode=mode, head_placement="lpt", **POOL, **sparse)
    with LLM(folder, **kw) as llm:
        assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == want
        reports = llm.engine.executor.reports
        assert sum(w.sparse_rows for s in reports for w in s.workers.values()) > 0
        if min_context:  # dense on the workers until the gate opened
            first = next(i for i, s in enumerate(reports) if any(w.sparse_rows for w in s.workers.values()))
            assert any(w.q_rows for s in reports[:first] for w in s.workers.values())


def test_dropped_pool_engine_stops_its_workers_and_a_new_one_starts(tiny_checkpoints, reference):
    """A pool-backed LLM dropped with `del` (no shutdown, no `with`) stops its worker processes
    and releases the process group, so a second pool-backed LLM starts in the same process."""
    import torch.distributed as dist

    folder = tiny_checkpoints["llama"][0]
    prompts = _ids(random_prompts(LENGTHS, seed=21))
    llm = LLM(folder, **_engine_kwargs(attention_workers=2, **POOL))
    procs = list(llm.engine.executor.runner.workers.procs.values())
    assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == reference("llama")
    del llm  # no gc.collect(): the LLM is in no reference cycle, so this alone stops them
    assert not dist.is_initialized()
    assert all(not p.is_alive() for p in procs)
    second = LLM(folder, **_engine_kwargs(attention_workers=1, pool_mode="head", **POOL))
    assert [o.token_ids for o in second.generate(prompts, PARAMS)] == reference("llama")
    # While it runs, a third one in this process gets a clear error, and the second goes on.
    with pytest.raises(RuntimeError, match="already runs a multi-rank engine"):
        LLM(folder, **_engine_kwargs(attention_workers=1, **POOL))
    assert [o.token_ids for o in second.generate(prompts[:2], PARAMS)] == reference("llama")[:2]
    second.shutdown()
    second.shutdown()  # twice is fine
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "arch,mode,workers", [("llama", "shard", 2), ("qwen2", "replicate", 2), ("mistral", "head", 2)]
)
def test_pipeline_stages_with_the_pool_match_single_process(
    tiny_checkpoints, reference, arch, mode, workers, tmp_path, monkeypatch
):
    """PP 2 + pool: each stage exchanges with the attention workers for its own layers (the
    workers serve the driver's layer, then stage 1's), sequences cross the threshold mid-decode."""
    folder = tiny_checkpoints[arch][0]
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    kw = _engine_kwargs(pipeline_parallel_size=2, attention_workers=workers, pool_mode=mode, **POOL)
    with LLM(folder, **kw) as llm:
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        reports = llm.engine.executor.reports
        assert [o.token_ids for o in outs] == reference(arch)
        assert sum(w.q_rows for s in reports for w in s.workers.values()) > 0
        assert max(s.pool_size for s in reports) == workers
        assert all(set(s.ranks) == {0, 1} for s in reports)  # both stages reported every step
        assert llm.engine.pool_manager.active_workers() == set()
    assert assert_pairs_mirror(str(tmp_path), 2 + workers) > 0


def test_a_script_without_a_main_guard_gets_a_clear_error(tiny_checkpoints, tmp_path):
    """Spawned ranks re-import the script; without the guard they fail while starting, and
    the driver says why instead of hanging."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "from fapool import LLM\n"
        f"LLM({str(tiny_checkpoints['llama'][0])!r}, device='cpu', attention_workers=1, pool_threshold=32)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "if __name__ == '__main__':" in done.stderr
