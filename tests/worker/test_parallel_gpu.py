"""Tensor / pipeline parallelism and TP with the attention pool on CUDA.

On the CPU: which backend and device every rank gets (comm.place_ranks), for the device
counts of the machines these runs are meant for.
On a GPU (skipped elsewhere, CI has none): TP=2, PP=2 and TP=2 with one attention worker give
the greedy tokens of the single-process engine on the same GPU, in float32. With one GPU all
ranks share it over gloo with host-staged tensors; on a machine with a GPU per rank the same
tests run over NCCL.
"""

import pytest
import torch
from gpu_marks import needs_cuda as needs_gpu
from p2p_order import assert_pairs_mirror
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.worker.comm import TRACE_ENV, Topology, place_ranks

# --- placement (CPU) ---------------------------------------------------------------------


def test_cpu_ranks_use_gloo_on_the_cpu():
    p = place_ranks("cpu", 3, device_count=8)
    assert (p.backend, p.devices, p.staged, p.ranks_sharing(0)) == ("gloo", ("cpu",) * 3, False, 3)


def test_one_gpu_is_shared_over_gloo():
    """TP 2 + 1 attention worker on one GPU: NCCL refuses two ranks on a device."""
    p = place_ranks("cuda", Topology(2, 1, 1).world_size, device_count=1)
    assert (p.backend, p.devices, p.staged, p.ranks_sharing(2)) == ("gloo", ("cuda",) * 3, True, 3)
    # Fewer GPUs than ranks, even by one: every rank shares the given device.
    p = place_ranks("cuda:1", 3, device_count=2)
    assert (p.backend, p.devices) == ("gloo", ("cuda:1",) * 3)


def test_a_gpu_per_rank_uses_nccl_in_topology_order():
    # Two GPUs: TP 2 (issue 9), or 1 dense + 1 attention worker.
    p = place_ranks("cuda", 2, device_count=2)
    assert (p.backend, p.devices, p.staged, p.ranks_sharing(1)) == ("nccl", ("cuda:0", "cuda:1"), False, 1)
    # Eight GPUs, TP 4 x PP 2 (issue 10): a stage's TP ranks on consecutive GPUs.
    topo = Topology(4, 2)
    p = place_ranks("cuda", topo.world_size, device_count=8)
    assert p.backend == "nccl"
    assert [p.devices[topo.dense_rank(1, t)] for t in range(4)] == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    # TP 2 + 6 attention workers on eight GPUs: the workers after the dense ranks.
    topo = Topology(2, 1, 6)
    p = place_ranks("cuda", topo.world_size, device_count=8)
    assert p.devices[topo.attention_rank(1)] == "cuda:2" and p.devices[topo.attention_rank(6)] == "cuda:7"
    # From the driver's GPU on, wrapping around.
    assert place_ranks("cuda:6", 4, device_count=8).devices == ("cuda:6", "cuda:7", "cuda:0", "cuda:1")


def test_torchrun_places_by_ranks_per_host():
    """Two hosts of 8 GPUs, 16 ranks: NCCL, rank r on cuda:(r % 8) of its host."""
    p = place_ranks("cuda", 16, device_count=8, local_world_size=8)
    assert p.backend == "nccl" and p.devices[9] == "cuda:1" and p.devices[15] == "cuda:7"
    assert place_ranks("cuda", 16, device_count=4, local_world_size=8).backend == "gloo"
    with pytest.raises(ValueError, match="world_size"):
        place_ranks("cuda", 0, device_count=1)


# --- GPU ---------------------------------------------------------------------------------

LENGTHS = [3, 10, 25, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=16)
# Triton's paged kernels want blocks of 16+. 10 blocks (160 tokens) cannot hold all five
# requests: preemption; a budget of 32 tokens splits the long prompts into chunks.
SMALL_CACHE = dict(block_size=16, num_kv_blocks=10, max_num_batched_tokens=32)
# Threshold 32: 3 and 10 stay local, 25 crosses it while decoding, 40 and 70 start past it.
POOL = dict(pool_threshold=32, tokens_per_pool_worker=32)


def _prompts():
    return [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=21)]


def _gpu_engine(folder, **kw):
    return LLM(folder, device="cuda", dtype="float32", worker_timeout_s=120.0, **kw)


@pytest.fixture(scope="module")
def gpu_reference(tiny_checkpoints):
    """The single-process engine's tokens on the same GPU (CUDA graphs, async scheduling)."""
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            llm = _gpu_engine(tiny_checkpoints["llama"][0], **kw)
            cache[key] = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
            del llm
            torch.cuda.empty_cache()
        return cache[key]

    return get


def _check_placement(runner, world_size):
    expect = "nccl" if torch.cuda.device_count() >= world_size else "gloo"
    assert runner.rank_devices.backend == expect
    assert runner.rank_devices.staged == (expect == "gloo")
    assert runner.kv_caches[0][0].is_cuda


@needs_gpu
@pytest.mark.parametrize("tp,pp,backend", [(2, 1, "triton"), (1, 2, "triton"), (2, 1, "torch")])
def test_parallel_on_gpu_matches_single_process(
    tiny_checkpoints, gpu_reference, tp, pp, backend, tmp_path, monkeypatch
):
    want = gpu_reference(attention_backend=backend, **SMALL_CACHE)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    kw = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, attention_backend=backend, **SMALL_CACHE)
    with _gpu_engine(tiny_checkpoints["llama"][0], **kw) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        engine, runner = llm.engine, llm.engine.executor.runner
        assert [o.token_ids for o in outs] == want
        assert engine.stats().num_preemptions > 0
        _check_placement(runner, tp * pp)
        stats = engine.executor.reports
        assert all(set(s.ranks) == set(range(tp * pp)) for s in stats)
        assert all(sum(s.ranks[r].compute_s for s in stats) > 0 for r in range(tp * pp))
        if tp > 1:
            assert sum(s.ranks[1].comm_s for s in stats) > 0  # all-reduces, staged or NCCL
        else:
            assert max(s.num_micro_batches for s in stats) == 2
    assert assert_pairs_mirror(str(tmp_path), tp * pp) > 0


@needs_gpu
def test_tp2_with_pool_on_gpu_matches_single_process(tiny_checkpoints, gpu_reference, tmp_path, monkeypatch):
    """KV sized by profiling the card (no block count given), at 10% of it: a tiny model's
    blocks are a few KB, so the whole card would mean millions of them. Every rank's fits."""
    want = gpu_reference(block_size=16, num_kv_blocks=64)  # room for all: no preemption, like below
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    kw = dict(tensor_parallel_size=2, attention_workers=1, block_size=16, gpu_memory_utilization=0.1, **POOL)
    with _gpu_engine(tiny_checkpoints["llama"][0], **kw) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        engine, runner = llm.engine, llm.engine.executor.runner
        assert [o.token_ids for o in outs] == want
        assert engine.stats().num_preemptions == 0
        _check_placement(runner, 3)
        # Ranks sharing the card split the profiled budget.
        assert runner.ranks_on_device == (1 if runner.rank_devices.backend == "nccl" else 3)
        assert runner.num_blocks >= 64 and runner.worker_num_blocks >= 64
        grown = {e.request_id for e in engine.pool_manager.history if e.action == "grow"}
        assert grown == {"2", "3", "4"}
        stats = engine.executor.reports
        assert sum(w.q_rows for s in stats for w in s.workers.values()) > 0
        assert sum(s.ranks[1].comm_s for s in stats) > 0 and sum(s.tp_comm_s for s in stats) > 0
    assert assert_pairs_mirror(str(tmp_path), 3) > 0


@needs_gpu
@pytest.mark.parametrize("r,f", [(2, 1), (1, 2)])
def test_afd_on_gpu_matches_single_process(tiny_checkpoints, gpu_reference, r, f, tmp_path, monkeypatch):
    """Attention-FFN disaggregation on the GPU(s): the Triton attention on the attention ranks,
    the FFN slices on the FFN ranks, the GPU profiled for the KV of each attention rank."""
    want = gpu_reference(**SMALL_CACHE)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    kw = dict(afd_attention_ranks=r, afd_ffn_ranks=f, micro_batches=2, **SMALL_CACHE)
    with _gpu_engine(tiny_checkpoints["llama"][0], **kw) as llm:
        outs = llm.generate(_prompts(), PARAMS)
        engine, runner = llm.engine, llm.engine.executor.runner
        assert [o.token_ids for o in outs] == want
        _check_placement(runner, r + f)
        assert engine.kv.pool.num_partitions == r
        stats = engine.executor.reports
        assert all(sum(s.ranks[k].compute_s for s in stats) > 0 for k in range(r + f))
    assert assert_pairs_mirror(str(tmp_path), r + f) > 0


@needs_gpu
def test_sparse_decode_inside_the_pool_on_gpu(tiny_checkpoints, tmp_path):
    """Sparse decode with two attention workers sharing the GPU: the driver selects, each
    holder runs the Triton work-balanced kernel on its chosen pages; greedy tokens equal the
    single-process Triton sparse engine's (graph-captured) with the same profile."""
    from fapool.sparse.profile import SparseProfile

    path = str(tmp_path / "sparse.json")
    SparseProfile("tiny", 16, 0.9, 4, 2, 4, 2, [[0.25, 0.5], [0.3, 0.4]]).save(path)
    folder = tiny_checkpoints["llama"][0]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([300, 150, 400, 90], seed=6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    kw = dict(block_size=16, num_kv_blocks=256, sparse_attention=path, sparse_min_context=0)
    single = _gpu_engine(folder, **kw)
    want = [o.token_ids for o in single.generate(prompts, params)]
    del single
    torch.cuda.empty_cache()
    pool = dict(attention_workers=2, pool_threshold=128, tokens_per_pool_worker=128)
    with _gpu_engine(folder, **kw, **pool) as llm:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        reports = llm.engine.executor.reports
        assert sum(w.sparse_rows for s in reports for w in s.workers.values()) > 0


@needs_gpu
@pytest.mark.parametrize(
    "kw",
    [
        dict(attention_workers=1, **POOL),
        dict(pipeline_parallel_size=2),
        dict(tensor_parallel_size=2),
        dict(tensor_parallel_size=2, attention_workers=1, **POOL),
    ],
    ids=["pool", "pp2", "tp2", "tp2-pool"],
)
def test_segment_graphs_give_the_eager_tokens(tiny_checkpoints, gpu_reference, kw):
    """A dense rank's decode work between exchanges (and, on TP ranks, between all-reduces)
    replays CUDA graphs (both micro-batch slots with the pool: its policy tries one and two);
    tokens equal the eager multi-rank engine's and the single process's."""
    folder = tiny_checkpoints["llama"][0]
    base = dict(block_size=16, num_kv_blocks=64)
    want = gpu_reference(**base)
    with _gpu_engine(folder, enforce_eager=True, **base, **kw) as llm:
        eager = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
        assert llm.engine.executor.runner.stage.graphs is None
    with _gpu_engine(folder, **base, **kw) as llm:
        graphed = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
        graphs = llm.engine.executor.runner.stage.graphs
        assert graphs is not None and graphs._graphs
        if "attention_workers" in kw:
            assert {slot for slot, _ in graphs._graphs} == {0, 1}
    assert graphed == eager == want


@needs_gpu
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_async_scheduling_on_gpu_gives_the_sync_tokens(tiny_checkpoints, tp, pp):
    """TP / PP schedule asynchronously on CUDA by default (steps on the runner's thread, the
    next step's input tokens filled from the one before): the tokens of async off."""
    folder = tiny_checkpoints["llama"][0]
    kw = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, block_size=16, num_kv_blocks=64)
    tokens = {}
    for on in (True, False):
        with _gpu_engine(folder, async_scheduling=on, **kw) as llm:
            assert llm.engine.async_scheduling == on
            tokens[on] = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
    assert tokens[True] == tokens[False]
