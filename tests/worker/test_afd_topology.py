"""Attention-FFN disaggregation (seed 002) across processes (gloo on CPU): greedy tokens equal
the single-process engine for r attention and f FFN ranks (the FFN tensor parallel for f > 1),
with and without ping-pong micro-batches, prefix caching and preemption; bad configurations
fail before any process starts; a dead or hung rank is named."""

import time

import pytest

from fapool import LLM, SamplingParams
from fapool.config import ConfigError
from fapool.worker.comm import TRACE_ENV, WorkerFailure
from p2p_order import assert_pairs_mirror
from tiny_models import random_prompts

LENGTHS = [3, 10, 25, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=30)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _kw(**kw):
    return dict(device="cpu", block_size=4, num_kv_blocks=64, worker_timeout_s=20.0, **kw)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            llm = LLM(tiny_checkpoints[arch][0], **_kw())
            cache[arch] = [o.token_ids for o in llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)]
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch,r,f,micro_batches",
    [
        ("llama", 2, 1, None),  # the r=2, f=1; 1 or 2 micro-batches chosen per step
        ("llama", 1, 2, 2),  # r=1, f=2: the FFN tensor parallel over two ranks; ping-pong
        ("qwen2", 2, 2, 2),  # biases, tied embeddings
        ("mistral", 1, 1, 1),
    ],
)
def test_afd_matches_single_process(tiny_checkpoints, reference, arch, r, f, micro_batches, tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    kw = _kw(afd_attention_ranks=r, afd_ffn_ranks=f, micro_batches=micro_batches)
    with LLM(tiny_checkpoints[arch][0], **kw) as llm:
        # Each attention rank holds one partition of the block ids: r x the blocks of one.
        assert llm.engine.num_kv_blocks == 64 * r and llm.engine.kv.pool.num_partitions == r
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        reports = llm.engine.executor.reports
    assert [o.token_ids for o in outs] == reference(arch)
    # Every rank worked: each attention rank ran requests, each FFN rank saw their tokens.
    for rank in range(r + f):
        assert sum(s.ranks[rank].num_tokens for s in reports) > 0, rank
        assert sum(s.ranks[rank].compute_s for s in reports) > 0, rank
    if micro_batches:
        assert max(s.num_micro_batches for s in reports) == micro_batches
    # What NCCL needs on GPUs: every pair of ranks posts its transfers in mirrored order.
    assert assert_pairs_mirror(str(tmp_path), r + f) > 0


def test_afd_with_prefix_caching_chunked_prefill_and_preemption(tiny_checkpoints):
    """Prompts sharing a prefix (hits pull a request onto the rank holding it), chunked prefill,
    and a cache so small that requests are preempted and recomputed."""
    folder = tiny_checkpoints["llama"][0]
    shared = list(range(3, 31))
    prompts = [shared + p for p in random_prompts([5, 9, 2, 14], seed=4)] + random_prompts([33, 7], seed=5)
    base = dict(device="cpu", block_size=4, max_num_batched_tokens=24, num_kv_blocks=20)
    want = [o.token_ids for o in LLM(folder, **base).generate(_ids(prompts), PARAMS)]
    kw = dict(base, afd_attention_ranks=2, afd_ffn_ranks=1, micro_batches=2)
    with LLM(folder, **kw) as llm:
        outs = llm.generate(_ids(prompts), PARAMS)
        stats = llm.engine.stats()
        assert stats.num_preemptions > 0
        assert sum(o.metrics.num_cached_tokens for o in outs) > 0
    assert [o.token_ids for o in outs] == want


def test_afd_with_async_scheduling_gives_the_sync_tokens(tiny_checkpoints):
    """Async scheduling with AFD: steps run on the driver's step thread while the engine
    schedules the next, each decode step's input token filled from the step before it when
    it starts; greedy and seeded tokens equal the synchronous engine's, through chunked
    prefill, prefix hits and preemption, and the steps really were launched."""
    folder = tiny_checkpoints["llama"][0]
    shared = list(range(3, 31))
    prompts = [shared + p for p in random_prompts([5, 9, 2, 14], seed=4)] + random_prompts([33, 7], seed=5)
    params = [PARAMS, SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=20)] * 3
    base = dict(device="cpu", block_size=4, max_num_batched_tokens=24, num_kv_blocks=20)
    kw = dict(base, afd_attention_ranks=2, afd_ffn_ranks=1, micro_batches=2)
    with LLM(folder, **kw) as llm:
        want = [o.token_ids for o in llm.generate(_ids(prompts), params)]
    with LLM(folder, async_scheduling=True, **kw) as llm:
        assert llm.engine.async_scheduling
        launched = []
        launch = llm.engine.executor.launch
        llm.engine.executor.launch = lambda sched: (launched.append(1), launch(sched))[1]
        outs = llm.generate(_ids(prompts), params)
        assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == want
    assert len(launched) > 10


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(afd_attention_ranks=0, afd_ffn_ranks=1), "afd_attention_ranks must be >= 1"),
        (dict(afd_attention_ranks=1, afd_ffn_ranks=0), "afd_ffn_ranks must be >= 1"),
        (dict(afd_attention_ranks=2), "needs afd_ffn_ranks"),
        (dict(afd_attention_ranks=1, afd_ffn_ranks=1, attention_workers=2), "attention_workers"),
        (dict(afd_attention_ranks=1, afd_ffn_ranks=1, tensor_parallel_size=2), "tensor_parallel_size"),
        (dict(afd_attention_ranks=1, afd_ffn_ranks=5), "does not divide intermediate_size"),
    ],
)
def test_bad_afd_configurations_fail_before_starting(tiny_checkpoints, kw, match):
    with pytest.raises(ConfigError, match=match):
        LLM(tiny_checkpoints["llama"][0], device="cpu", **kw)


def _steps_until_failure(llm, on_step) -> WorkerFailure:
    engine = llm.engine
    for p in random_prompts(LENGTHS, seed=21):
        engine.add_request(p, PARAMS)
    steps = 0
    with pytest.raises(WorkerFailure) as info:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            on_step(steps)
    with pytest.raises(WorkerFailure):  # the engine stays failed, it does not hang either
        engine.step()
    return info.value


def test_dead_ffn_rank_is_named(tiny_checkpoints):
    with LLM(tiny_checkpoints["llama"][0], **_kw(afd_attention_ranks=2, afd_ffn_ranks=1)) as llm:
        procs = llm.engine.executor.runner.workers.procs

        def kill(step):
            if step == 3:
                procs[2].kill()

        err = _steps_until_failure(llm, kill)
        assert err.rank == 2 and "AFD FFN rank 2" in str(err) and "exited" in str(err)


def test_hung_ffn_rank_times_out(tiny_checkpoints):
    kw = {**_kw(afd_attention_ranks=1, afd_ffn_ranks=1), "worker_timeout_s": 2.0}
    t = time.monotonic()
    with LLM(tiny_checkpoints["llama"][0], **kw) as llm:
        runner = llm.engine.executor.runner

        def hang(step):
            if step == 3:
                runner.fault_hang[1] = 60.0

        err = _steps_until_failure(llm, hang)
        assert err.rank == 1 and "AFD FFN rank 1" in str(err) and "no answer within 2 s" in str(err)
    assert time.monotonic() - t < 30.0  # shutdown kills the stalled rank rather than waiting
