"""The static baselines across processes (gloo on CPU): tensor parallelism, pipeline
parallelism and both together give the single-process engine's greedy tokens, with chunked
prefill and preemption; unsupported shapes fail before any process starts; a dead or hung
dense rank stops the engine with an error naming it instead of hanging."""

import time

import pytest
import torch
from p2p_order import assert_pairs_mirror
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.config import ConfigError
from fapool.entrypoints.breakdown import summarize
from fapool.layers.linear import MergedLinear
from fapool.layers.tp import shard_linear
from fapool.worker.comm import TRACE_ENV, WorkerFailure
from fapool.worker.dense_worker import stage_layers
from fapool.entrypoints.breakdown import summarize_ranks

LENGTHS = [3, 10, 25, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12)
# Block size 4 with 24 blocks (96 tokens) cannot hold all five requests: preemption. A token
# budget of 32 splits the long prompts into chunks.
ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=24, max_num_batched_tokens=32, worker_timeout_s=20.0)


def _prompts():
    return [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=21)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            llm = LLM(tiny_checkpoints[arch][0], **ENGINE)
            cache[arch] = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
            assert llm.engine.stats().num_preemptions > 0
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch,tp,pp",
    [("llama", 2, 1), ("llama", 1, 2), ("qwen2", 2, 1), ("qwen2", 1, 2), ("llama", 2, 2)],
)
def test_parallel_matches_single_process(tiny_checkpoints, reference, arch, tp, pp, tmp_path, monkeypatch):
    folder = tiny_checkpoints[arch][0]
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    with LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        engine, runner = llm.engine, llm.engine.executor.runner
        assert [o.token_ids for o in outs] == reference(arch)
        assert engine.stats().num_preemptions > 0
        # The driver holds its stage's layers and its share of the KV heads (2 KV heads).
        assert len(runner.kv_caches) == 2 // pp
        assert runner.kv_caches[0][0].shape[2] == 2 // tp
        # Every dense rank reported every step; with stages, steps ran 2 micro-batches.
        stats = engine.executor.reports
        assert all(set(s.ranks) == set(range(tp * pp)) for s in stats)
        assert all(sum(s.ranks[r].compute_s for s in stats) > 0 for r in range(tp * pp))
        assert max(s.num_micro_batches for s in stats) == pp
        if tp > 1:
            assert sum(s.ranks[1].comm_s for s in stats) > 0  # all-reduces
        assert summarize(stats)["driver"]["dense_s"] > 0  # what `fapool generate` prints
        assert set(summarize_ranks(stats)) == set(range(tp * pp))
    # What NCCL needs on GPUs: every pair of ranks posts its transfers in mirrored order.
    assert assert_pairs_mirror(str(tmp_path), tp * pp) > 0


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from tiny_models import make_checkpoint

    folder = str(tmp_path_factory.mktemp("llama4"))
    make_checkpoint(folder, "llama", seed=7, num_hidden_layers=4)
    return folder


POOLED = dict(attention_workers=1, pool_threshold=32, tokens_per_pool_worker=16)


@pytest.mark.parametrize("extra", [{}, POOLED], ids=["pp3", "pp3-pool"])
def test_three_pipeline_stages_match_single_process(four_layers, extra, tmp_path, monkeypatch):
    """Four layers over three stages (2 / 1 / 1): every stage's activations travel on to the
    next, the last returns the logits; beside an attention pool, each stage leader exchanges
    with the worker for its own layers. Tokens equal the single process, with preemption."""
    with LLM(four_layers, **ENGINE) as llm:
        reference = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    with LLM(four_layers, pipeline_parallel_size=3, **ENGINE, **extra) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        assert [o.token_ids for o in outs] == reference
        assert len(llm.engine.executor.runner.kv_caches) == 2  # the driver's stage: layers 0 and 1
        stats = llm.engine.executor.reports
        assert all({0, 1, 2} <= set(s.ranks) for s in stats)
        assert max(s.num_micro_batches for s in stats) == 3
        if extra:
            assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
    assert assert_pairs_mirror(str(tmp_path), 3 + (1 if extra else 0)) > 0


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_async_scheduling_gives_the_sync_tokens(tiny_checkpoints, reference, tp, pp):
    """Async scheduling with TP / PP: steps run on the runner's thread while the engine
    schedules the next, each decode step's input token filled from the step before it when
    it starts; greedy tokens equal the synchronous engine's (through preemption and chunked
    prefill), and the steps really were launched."""
    folder = tiny_checkpoints["llama"][0]
    with LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, async_scheduling=True, **ENGINE) as llm:
        assert llm.engine.async_scheduling
        launched = []
        launch = llm.engine.executor.launch
        llm.engine.executor.launch = lambda sched: (launched.append(1), launch(sched))[1]
        outs = llm.generate(_prompts(), PARAMS)
        assert [o.token_ids for o in outs] == reference("llama")
        assert len(launched) > 5


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tensor_parallel_size=4), "num_key_value_heads"),  # 2 KV heads
        (dict(tensor_parallel_size=3), "num_attention_heads"),  # 4 heads
        (dict(pipeline_parallel_size=3), "2 layers"),
    ],
)
def test_unsupported_shapes_fail_before_starting(tiny_checkpoints, kw, match):
    with pytest.raises(ConfigError, match=match):
        LLM(tiny_checkpoints["llama"][0], device="cpu", **kw)


def test_sparse_attention_with_tp_fails_before_starting(tiny_checkpoints, tmp_path):
    """The profile's per-head budgets are for the whole model, not a rank's heads."""
    from fapool.sparse.profile import SparseProfile

    profile = SparseProfile(
        model="tiny-llama", block_size=4, target_recall=0.95, min_blocks=1, num_layers=2, num_heads=4,
        num_kv_heads=2, kv_budget=[[1.0, 0.5]] * 2,
    )
    path = str(tmp_path / "profile.json")
    profile.save(path)
    with pytest.raises(ConfigError, match="sparse_attention"):
        LLM(tiny_checkpoints["llama"][0], device="cpu", tensor_parallel_size=2, sparse_attention=path)


def test_tp_slices_every_fused_part_by_heads():
    """Rank 1 of 2 on q|k|v with 4 q and 2 KV heads of dim 2: q heads 2-3, KV head 1 of each."""
    qkv = MergedLinear(3, (8, 4, 4), ("q", "k", "v"), bias=True)
    with torch.no_grad():
        qkv.weight.copy_(torch.arange(16.0)[:, None].expand(16, 3))
        qkv.bias.copy_(torch.arange(16.0))
    got = shard_linear(qkv, "column", 1, 2)
    assert got["weight"][:, 0].tolist() == [4, 5, 6, 7, 10, 11, 14, 15]
    assert got["bias"].tolist() == [4, 5, 6, 7, 10, 11, 14, 15]
    o = torch.nn.Linear(8, 3, bias=False)
    assert torch.equal(shard_linear(o, "row", 1, 2)["weight"], o.weight[:, 4:])
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]


def _steps_until_failure(llm, on_step, limit_s: float) -> WorkerFailure:
    engine = llm.engine
    for p in _prompts():
        engine.add_request(p["prompt_token_ids"], PARAMS)
    steps, start = 0, None
    with pytest.raises(WorkerFailure) as info:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if on_step(steps):
                start = time.monotonic()
    assert start is not None and time.monotonic() - start < limit_s
    with pytest.raises(WorkerFailure):  # the engine stays failed, it does not hang either
        engine.step()
    return info.value


def test_dead_stage_is_named(tiny_checkpoints):
    """Pipeline stage 1 is killed: the driver's wait for its logits fails at once."""
    with LLM(tiny_checkpoints["llama"][0], pipeline_parallel_size=2, **ENGINE) as llm:
        procs = llm.engine.executor.runner.workers.procs

        def kill(step):
            if step == 3:
                procs[1].kill()
                return True

        err = _steps_until_failure(llm, kill, limit_s=10.0)
        assert err.rank == 1 and "rank 1 (pipeline stage 1, tensor-parallel rank 0)" in str(err)


def test_hung_tensor_parallel_peer_times_out(tiny_checkpoints):
    """TP rank 1 stalls: the driver's all-reduce gives up after worker_timeout_s."""
    kw = {**ENGINE, "worker_timeout_s": 2.0}
    with LLM(tiny_checkpoints["llama"][0], tensor_parallel_size=2, **kw) as llm:
        runner = llm.engine.executor.runner

        def hang(step):
            if step == 3:
                runner.fault_hang[1] = 60.0
                return True

        t = time.monotonic()
        err = _steps_until_failure(llm, hang, limit_s=10.0)
        assert err.rank == 1 and "no answer within 2 s" in str(err)
    assert time.monotonic() - t < 20.0  # shutdown kills the stalled rank rather than waiting
