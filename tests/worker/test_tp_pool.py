"""Tensor parallelism together with the attention pool (gloo on CPU): greedy tokens equal the
single-process engine in every pool mode, with sequences that cross the threshold mid-decode
and others that never do; a lost attention worker is recomputed; a lost TP rank stops the
engine with an error naming it instead of hanging."""

import time

import pytest
from p2p_order import assert_pairs_mirror
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.worker.comm import TRACE_ENV, WorkerFailure

# Threshold 32 with block size 4: prompts of 3 and 8 tokens stay local through 20 new tokens,
# 20 crosses it while decoding, 40 and 70 start past it; tokens_per_pool_worker 16 makes the
# long ones span two workers.
LENGTHS = [3, 8, 20, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=20)
ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=256)
POOL = dict(pool_threshold=32, tokens_per_pool_worker=16, worker_timeout_s=20.0)


def _prompts():
    return [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=21)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = [o.token_ids for o in LLM(tiny_checkpoints[arch][0], **ENGINE).generate(_prompts(), PARAMS)]
        return cache[arch]

    return get


def _check_parity_and_pool(llm, want, workers):
    outs = llm.generate(_prompts(), PARAMS)
    engine, runner = llm.engine, llm.engine.executor.runner
    assert [o.token_ids for o in outs] == want
    # The driver holds one of the 2 KV heads locally; workers hold both (head mode: one each).
    assert runner.kv_caches[0][0].shape[2] == 1
    # The pool served the long requests only: 20 crossed mid-decode, 3 and 8 never did.
    first_grow = {}
    for e in engine.pool_manager.history:
        if e.action == "grow":
            first_grow.setdefault(e.request_id, e.step)
    assert set(first_grow) == {"2", "3", "4"}
    assert first_grow["2"] > first_grow["4"]
    stats = engine.executor.reports
    assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
    assert max(s.pool_size for s in stats) == workers
    assert engine.pool_manager.active_workers() == set()
    # Both TP ranks reported every step; rank 1's all-reduces and exchanges took time.
    assert all(set(s.ranks) == {0, 1} for s in stats)
    assert sum(s.ranks[1].comm_s for s in stats) > 0 and sum(s.tp_comm_s for s in stats) > 0


# Each case starts 3-4 processes, so the matrix is small: shard mode with one worker here and
# two in the test below (llama), head mode with two (qwen2). The driver's q/k/v gather is the
# same for every mode (workers index heads globally); replicate mode and qwen2 in shard mode
# also give equal tokens (run by hand; `fapool bench pool --tp 2` prints parity per mode).
@pytest.mark.parametrize("arch,mode,workers", [("llama", "shard", 1), ("qwen2", "head", 2)])
def test_tp2_with_pool_matches_single_process(tiny_checkpoints, reference, arch, mode, workers, tmp_path, monkeypatch):
    kw = dict(tensor_parallel_size=2, attention_workers=workers, pool_mode=mode, **POOL, **ENGINE)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    with LLM(tiny_checkpoints[arch][0], **kw) as llm:
        _check_parity_and_pool(llm, reference(arch), workers)
    # What NCCL needs on GPUs: every pair of ranks posts its transfers in mirrored order.
    assert assert_pairs_mirror(str(tmp_path), 2 + workers) > 0


def test_tp2_pool_of_two_then_a_lost_worker_then_a_lost_tp_rank(tiny_checkpoints, reference):
    """One engine (processes are costly to start): parity with two workers; attention worker
    1 killed mid-run: its requests are recomputed, tokens unchanged; then TP rank 1 killed:
    the next step fails at once, naming it, and the engine stays failed."""
    with LLM(tiny_checkpoints["llama"][0], tensor_parallel_size=2, attention_workers=2, **POOL, **ENGINE) as llm:
        _check_parity_and_pool(llm, reference("llama"), 2)
        engine, runner = llm.engine, llm.engine.executor.runner
        ids = [engine.add_request(p["prompt_token_ids"], PARAMS) for p in _prompts()]
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            steps += 1
            if steps == 4:
                runner.workers.procs[runner.topology.attention_rank(1)].kill()
        assert [w for w, _ in engine.worker_failures] == [1]
        assert [done[i] for i in ids] == reference("llama")

        engine.add_request(_prompts()[3]["prompt_token_ids"], PARAMS)
        engine.step()
        runner.workers.procs[1].kill()
        start = time.monotonic()
        with pytest.raises(WorkerFailure) as info:
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 10.0
        assert info.value.rank == 1
        assert "dense worker rank 1 (pipeline stage 0, tensor-parallel rank 1)" in str(info.value)
        with pytest.raises(WorkerFailure):
            engine.step()


def test_tp2_pp2_with_pool_matches_single_process(tiny_checkpoints, reference, tmp_path, monkeypatch):
    """TP 2 x PP 2 next to an attention worker: each stage's TP rank 0 exchanges every head of
    its stage with the worker for the stage's layers; tokens equal the single process's."""
    kw = dict(tensor_parallel_size=2, pipeline_parallel_size=2, attention_workers=1, **POOL, **ENGINE)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    with LLM(tiny_checkpoints["llama"][0], **kw) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        assert [o.token_ids for o in outs] == reference("llama")
        stats = llm.engine.executor.reports
        assert all(set(s.ranks) == {0, 1, 2, 3} for s in stats)
        # The pooled KV of every layer lives only on the worker, so parity needs both stages'
        # leaders (ranks 0 and 2) to have exchanged with it.
        assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
        assert llm.engine.pool_manager.active_workers() == set()
    assert assert_pairs_mirror(str(tmp_path), 5) > 0
