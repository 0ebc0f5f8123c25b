"""Sparse decode end to end on a tiny Llama, profiles, and calibration mechanics; on a GPU
(skipped elsewhere) the Triton path through the engine with CUDA graphs."""

import math

import pytest
import torch
from gpu_marks import needs_cuda as needs_gpu
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.attention.torch_ref import TorchReferenceBackend
from fapool.entrypoints.cli import build_parser
from fapool.sparse.calibrate import build_profile, calibrate, load_model
from fapool.sparse.profile import SparseProfile, choose_budgets
from fapool.sparse.selection import budget_blocks

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def llama_folder(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]  # 2 layers, 4 query heads, 2 KV heads


def _generate(folder, prompts, **kw):
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=256, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm


def test_full_budget_greedy_equals_dense(llama_folder, tmp_path):
    path = str(tmp_path / "full.json")
    SparseProfile.full(2, 2, 4, block_size=4).save(path)
    prompts = random_prompts([37, 120, 9], seed=5)
    dense, _ = _generate(llama_folder, prompts)
    sparse, llm = _generate(llama_folder, prompts, sparse_attention=path, sparse_min_context=0)
    assert sparse == dense
    assert llm.engine.config.sparse_attention == path


def test_small_budget_takes_the_sparse_path(llama_folder, tmp_path):
    path = str(tmp_path / "sparse.json")
    profile = SparseProfile("tiny", 4, 0.9, 4, 2, 4, 2, [[0.2, 0.5], [0.3, 0.25]])
    profile.save(path)
    prompts = random_prompts([150, 90], seed=6)
    tokens, llm = _generate(llama_folder, prompts, sparse_attention=path, sparse_min_context=0)
    assert all(len(t) == 24 for t in tokens)
    backends = [layer.self_attn.backend for layer in llm.engine.executor.runner.model.model.layers]
    read = sum(b.sparse_tokens for b in backends)
    full = sum(b.sparse_dense_tokens for b in backends)
    assert 0 < read < 0.6 * full


def test_gate_crossing_mid_generation(llama_folder, tmp_path):
    """sparse_min_context 100 with two 80-token prompts: decode steps until the longest KV
    reaches 100 attend densely, so those tokens are dense's exactly; later steps go sparse.
    A gate past every length gives dense's tokens throughout and no sparse read; the default
    gate (4096) leaves these short prompts dense too."""
    path = str(tmp_path / "sparse.json")
    SparseProfile("tiny", 4, 0.9, 4, 2, 4, 2, [[0.2, 0.5], [0.3, 0.25]]).save(path)
    prompts = random_prompts([80, 80], seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    def run(**kw):
        llm = LLM(llama_folder, device="cpu", block_size=4, num_kv_blocks=256, **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        layers = llm.engine.executor.runner.model.model.layers
        read = sum(getattr(ly.self_attn.backend, "sparse_tokens", 0) for ly in layers)  # dense: none
        return [o.outputs[0].token_ids for o in outs], read

    dense, _ = run()
    crossing, read = run(sparse_attention=path, sparse_min_context=100)
    # Generated token j (j >= 1) comes from a step over 80 + j cached tokens: dense for j < 20.
    assert all(c[:20] == d[:20] for c, d in zip(crossing, dense))
    assert read > 0
    shut, shut_read = run(sparse_attention=path, sparse_min_context=10_000)
    assert shut == dense and shut_read == 0
    default, default_read = run(sparse_attention=path)
    assert default == dense and default_read == 0


def test_copy_on_write_copies_the_summaries(llama_folder, tmp_path):
    """ModelRunner.copy_blocks copies each layer's key summaries with the KV blocks."""
    path = str(tmp_path / "sparse.json")
    SparseProfile("tiny", 4, 0.9, 4, 2, 4, 2, [[0.2, 0.5], [0.3, 0.25]]).save(path)
    prompts = random_prompts([30], seed=4)
    tokens, llm = _generate(llama_folder, prompts, sparse_attention=path, sparse_min_context=0)
    runner = llm.engine.executor.runner
    backends = [layer.self_attn.backend for layer in runner.model.model.layers]
    assert all(b.kmin is not None for b in backends)
    with torch.inference_mode():  # as in a step (the cache tensors are inference tensors)
        runner.copy_blocks([(2, 200), (5, 201)])
    for b in backends:
        assert torch.equal(b.kmin[[200, 201]], b.kmin[[2, 5]]) and torch.equal(
            b.kmax[[200, 201]], b.kmax[[2, 5]]
        )
    for k, _ in runner.kv_caches:
        assert torch.equal(k[[200, 201]], k[[2, 5]])


def test_sparse_min_context_is_validated(llama_folder, tmp_path):
    from fapool.config import ConfigError

    path = str(tmp_path / "full.json")
    SparseProfile.full(2, 2, 4).save(path)
    with pytest.raises(ConfigError, match="sparse_min_context"):
        LLM(llama_folder, device="cpu", num_kv_blocks=64, sparse_attention=path, sparse_min_context=-1)


def test_profile_must_match_the_model(llama_folder, tmp_path):
    path = str(tmp_path / "bad.json")
    SparseProfile.full(3, 2, 4).save(path)
    with pytest.raises(ValueError, match="3 layers"):
        LLM(llama_folder, device="cpu", num_kv_blocks=64, sparse_attention=path)


def test_profile_roundtrip_and_uniform(tmp_path):
    p = SparseProfile("m", 16, 0.95, 4, 2, 4, 2, [[0.1, 0.3], [0.5, 0.1]], calibration={"x": 1})
    p.save(str(tmp_path / "p.json"))
    q = SparseProfile.load(str(tmp_path / "p.json"))
    assert q == p
    assert q.uniform().kv_budget == [[0.25, 0.25], [0.25, 0.25]]
    with pytest.raises(ValueError):
        SparseProfile("m", 16, 0.95, 4, 1, 4, 2, [[0.0, 0.3]])


def test_version_1_profile_loads_as_one_fraction_per_head(tmp_path):
    """The first profile format (one fraction per head, no length bins) still loads, runs the
    plain fraction rule, and saves in the current version."""
    import json
    import os

    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "benchmarks", "results", "sparse_profile-smollm2.json"
    )
    with open(path) as f:
        assert json.load(f)["version"] == 1
    p = SparseProfile.load(path)
    assert p.lengths == [] and p.version == 2
    for nb in (1, 7, 64, 500):
        want = [max(min(p.min_blocks, nb), min(nb, math.ceil(f * nb - 1e-6))) for f in p.kv_budget[3]]
        assert budget_blocks(p.rule(3), nb, p.min_blocks).tolist() == want
    p.save(str(tmp_path / "p.json"))
    assert SparseProfile.load(str(tmp_path / "p.json")) == p


def test_choose_budgets_smallest_meeting_target():
    grid = [0.25, 0.5, 0.75, 1.0]
    recall = [[[0.9, 0.96, 0.99, 1.0], [0.5, 0.7, 0.95, 1.0], [0.97, 0.98, 0.99, 1.0], [0.1, 0.2, 0.3, 1.0]]]
    kv, need = choose_budgets(recall, grid, 0.95, group=2)
    assert need == [[0.5, 0.75, 0.25, 1.0]]
    assert kv == [[0.75, 1.0]]


def test_calibration_recall_curves(llama_folder):
    model, _, _ = load_model(llama_folder, TorchReferenceBackend())
    windows = random_prompts([96, 96], seed=7)
    grid = [0.1, 0.25, 0.5, 0.75, 1.0]
    curves = calibrate(model, windows, block_size=4, grid=grid, min_blocks=2, min_pos=32, stride=8, chunk=40)
    recall = curves.recall
    assert recall.shape == (2, 1, 2, 4, 5)  # windows, one length bin, layers, query heads, grid
    assert curves.positions.tolist() == [[8.0], [8.0]]  # positions 32, 40, ..., 88
    assert torch.all(recall[..., 1:] >= recall[..., :-1] - 1e-6)  # more blocks, more mass
    torch.testing.assert_close(recall[..., -1], torch.ones(2, 1, 2, 4))
    assert bool((recall > 0).all())
    # the recorder left the model's own backends in place
    assert all(isinstance(layer.self_attn.backend, TorchReferenceBackend) for layer in model.model.layers)
    profile = build_profile(curves, grid, 0.9, 2, 4, 2, "tiny", {})
    assert profile.num_layers == 2 and all(f in grid for row in profile.kv_budget for f in row)
    assert profile.lengths == [] and "stability_pearson_halves" in profile.calibration


def test_calibration_by_length_gives_a_length_rule(llama_folder, tmp_path):
    """Bins split the positions by context; the profile then holds budgets per bin, the rule
    interpolates between them, and one bin's curves pooled equal the unbinned run."""
    model, _, _ = load_model(llama_folder, TorchReferenceBackend())
    windows = random_prompts([96, 96, 96], seed=8)
    grid = [0.1, 0.25, 0.5, 0.75, 1.0]
    kw = dict(block_size=4, grid=grid, min_blocks=2, min_pos=16, stride=4, chunk=40)
    binned = calibrate(model, windows, bins=[16, 32, 64], **kw)
    flat = calibrate(model, windows, **kw)
    assert binned.recall.shape == (3, 3, 2, 4, 5)
    # positions 16..92 step 4 = contexts 17..93: [16, 32) holds 4, [32, 64) 8, [64, ..) 8
    assert binned.positions[0].tolist() == [4.0, 8.0, 8.0]
    torch.testing.assert_close(binned.pooled(), flat.pooled())
    profile = build_profile(binned, grid, 0.9, 2, 4, 2, "tiny", {})
    assert len(profile.lengths) == 3 and profile.lengths == sorted(profile.lengths)
    assert profile.lengths[0] == pytest.approx((5 + 6 + 7 + 8) / 4 * 4)  # bin 0's mean visible blocks x 4
    assert profile.kv_budget == profile.kv_budget_by_length[0]
    assert len(profile.calibration["mean_budget_by_length"]) == 3
    profile.save(str(tmp_path / "p.json"))
    again = SparseProfile.load(str(tmp_path / "p.json"))
    assert again == profile
    # At each calibrated length the rule gives that bin's blocks, made non-decreasing in the
    # length (a longer context never gets fewer blocks).
    nbs = torch.tensor(profile.lengths, dtype=torch.float64) / 4
    want = torch.cummax(
        torch.tensor(profile.kv_budget_by_length, dtype=torch.float64)[:, 1] * nbs[:, None], 0
    ).values
    for j, nb in enumerate(nbs):
        torch.testing.assert_close(profile.rule(1).raw(nb), want[j])
    retargeted = profile.retarget(0.8)
    assert len(retargeted.kv_budget_by_length) == 3
    assert retargeted.kv_budget == retargeted.kv_budget_by_length[0]
    assert all(
        a <= b
        for t8, t9 in zip(retargeted.kv_budget_by_length, profile.kv_budget_by_length)
        for r8, r9 in zip(t8, t9)
        for a, b in zip(r8, r9)
    )


def test_oracle_selector_bounds_the_runtime_one(llama_folder):
    """Ranking blocks by their true mass keeps at least as much of a KV head's (summed over its
    query heads) attention at every budget as the key min/max bound does."""
    model, _, _ = load_model(llama_folder, TorchReferenceBackend())
    windows = random_prompts([96, 96], seed=9)
    kw = dict(block_size=4, grid=[0.1, 0.25, 0.5, 0.75, 1.0], min_blocks=2, min_pos=32, stride=8)
    bound = calibrate(model, windows, **kw).pooled()  # [L, Hq, F]
    oracle = calibrate(model, windows, selector="oracle", **kw).pooled()
    per_kv = lambda r: r.view(r.shape[0], 2, 2, -1).sum(2)  # noqa: E731 -- 4 query heads, 2 KV heads
    assert torch.all(per_kv(oracle) >= per_kv(bound) - 1e-5)
    assert bool((per_kv(oracle) > per_kv(bound) + 1e-4).any())  # and strictly more somewhere
    with pytest.raises(ValueError, match="selector"):
        calibrate(model, windows, selector="random", **kw)


def test_length_rule_profiles_are_validated():
    table = [[0.5, 0.25], [0.5, 0.5]]
    with pytest.raises(ValueError, match="one table per calibrated length"):
        SparseProfile("m", 16, 0.9, 4, 2, 4, 2, table, lengths=[512.0])
    with pytest.raises(ValueError, match="ascending"):
        SparseProfile(
            "m", 16, 0.9, 4, 2, 4, 2, table, lengths=[512.0, 256.0], kv_budget_by_length=[table, table]
        )
    with pytest.raises(ValueError, match="shortest"):
        SparseProfile(
            "m",
            16,
            0.9,
            4,
            2,
            4,
            2,
            table,
            lengths=[256.0, 512.0],
            kv_budget_by_length=[[[0.5, 0.5]] * 2, table],
        )


def test_uniform_of_a_length_rule_keeps_the_total_at_each_length():
    short, long = [[0.5, 0.25], [0.75, 0.5]], [[0.25, 0.125], [0.25, 0.25]]
    p = SparseProfile(
        "m", 16, 0.9, 4, 2, 4, 2, short, lengths=[1024.0, 4096.0], kv_budget_by_length=[short, long]
    )
    u = p.uniform()
    assert u.kv_budget_by_length == [[[0.5, 0.5]] * 2, [[0.21875, 0.21875]] * 2]
    for ctx in (1024, 4096):
        assert u.mean_budget_at(ctx) == pytest.approx(p.mean_budget_at(ctx), abs=2 / (ctx / 16))
    # Between the lengths the block count is interpolated, past them it keeps the last slope.
    assert p.fractions_at(2048)[0][0] == math.ceil(32 + (128 - 64) * (64 - 32) / (256 - 64)) / 128
    assert p.fractions_at(16384)[1][0] < p.fractions_at(4096)[1][0]


def test_cli_has_calibrate_heads_and_flag():
    ns = build_parser().parse_args(["calibrate-heads", "--windows", "2", "--target-recall", "0.9"])
    assert ns.windows == 2 and ns.target_recall == 0.9 and callable(ns.func)
    ns = build_parser().parse_args(["generate", "--sparse-attention", "p.json", "--prompt", "x"])
    assert ns.sparse_attention == "p.json"


# --- GPU: the Triton path (selection + balanced decode, summaries in write_kv) in the engine ---

# Chunked prefill (64-token steps) mixes prefill chunks with decode rows; the rest is decode-only
# steps, which replay CUDA graphs.
GPU_KW = dict(
    device="cuda",
    dtype="float32",
    block_size=16,
    num_kv_blocks=512,
    max_num_seqs=8,
    max_num_batched_tokens=64,
)


def _gpu_generate(folder, prompts, max_tokens=40, **kw):
    llm = LLM(folder, **GPU_KW, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs], llm


def _sparse_backends(llm):
    return [layer.self_attn.backend for layer in llm.engine.executor.runner.model.model.layers]


@needs_gpu
def test_gpu_full_budget_greedy_equals_dense(llama_folder, tmp_path):
    """Budgets covering every block: each decode row attends over all its blocks through the
    Triton selection and balanced kernel (in graphs), and the greedy tokens are dense's."""
    path = str(tmp_path / "full.json")
    SparseProfile.full(2, 2, 4, block_size=16).save(path)
    prompts = random_prompts([37, 300, 9, 150, 64], seed=5)
    dense, _ = _gpu_generate(llama_folder, prompts)
    sparse, llm = _gpu_generate(llama_folder, prompts, sparse_attention=path, sparse_min_context=0)
    runner = llm.engine.executor.runner
    assert runner.use_cuda_graphs and runner.decode_graphs is not None and runner.decode_graphs.graphs
    assert all(b.triton and b.sparse_calls > 0 for b in _sparse_backends(llm))
    assert sparse == dense


SHORT, LONG = [[0.5, 0.6], [0.4, 0.5]], [[0.25, 0.4], [0.2, 0.3]]


@needs_gpu
@pytest.mark.parametrize(
    "profile",
    [
        SparseProfile("tiny", 16, 0.9, 4, 2, 4, 2, [[0.25, 0.5], [0.3, 0.4]]),
        # a length rule: the prompts (90-400 tokens) sit below, between and past its knots
        SparseProfile(
            "tiny", 16, 0.9, 4, 2, 4, 2, SHORT, lengths=[96.0, 256.0], kv_budget_by_length=[SHORT, LONG]
        ),
    ],
    ids=["fractions", "length-rule"],
)
def test_gpu_real_budget_runs_in_graphs(llama_folder, tmp_path, profile):
    """Budgets of 20-60% of the blocks: the decode steps replay CUDA graphs (with async
    scheduling) and give the Triton path's tokens without graphs. (The Triton path against the
    torch one, with a tolerance for TF32 dots: test_triton_select.py.)"""
    path = str(tmp_path / "sparse.json")
    profile.save(path)
    prompts = random_prompts([300, 150, 400, 90], seed=6)
    tokens, llm = _gpu_generate(llama_folder, prompts, sparse_attention=path, sparse_min_context=0)
    runner = llm.engine.executor.runner
    assert runner.use_cuda_graphs and runner.decode_graphs is not None and runner.decode_graphs.graphs
    assert llm.engine.async_scheduling
    assert all(b.triton and b.sparse_calls > 0 for b in _sparse_backends(llm))
    llm_eager = LLM(llama_folder, **GPU_KW, sparse_attention=path, sparse_min_context=0)
    llm_eager.engine.executor.runner.use_cuda_graphs = False
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    eager = [
        o.outputs[0].token_ids for o in llm_eager.generate([{"prompt_token_ids": p} for p in prompts], params)
    ]
    assert tokens == eager
    # The same engine over the torch path reads well under all the blocks: the budget is real.
    _, ref_llm = _gpu_generate(
        llama_folder, prompts, sparse_attention=path, sparse_min_context=0, attention_backend="torch"
    )
    read = sum(b.sparse_tokens for b in _sparse_backends(ref_llm))
    assert 0 < read < 0.7 * sum(b.sparse_dense_tokens for b in _sparse_backends(ref_llm))


@needs_gpu
def test_gpu_gate_crossing_captures_both_graphs(llama_folder, tmp_path):
    """sparse_min_context 200 with prompts of 150 and 120 tokens and 80 new ones: the decode
    graphs hold a dense and a sparse variant, the steps before the crossing give dense's tokens
    exactly, and graphs give the eager engine's tokens."""
    path = str(tmp_path / "sparse.json")
    SparseProfile("tiny", 16, 0.9, 4, 2, 4, 2, [[0.25, 0.5], [0.3, 0.4]]).save(path)
    prompts = random_prompts([150, 120], seed=9)
    dense, _ = _gpu_generate(llama_folder, prompts, max_tokens=80)
    tokens, llm = _gpu_generate(
        llama_folder, prompts, max_tokens=80, sparse_attention=path, sparse_min_context=200
    )
    graphs = llm.engine.executor.runner.decode_graphs
    assert graphs is not None and {key[2] for key in graphs.graphs} == {False, True}
    # Token j (j >= 1) of the 150-token row comes from a step whose longest KV is 150 + j:
    # dense for j < 50; the shorter row trails it by the chunked prefill's few steps.
    assert all(t[:40] == d[:40] for t, d in zip(tokens, dense))
    eager_llm = LLM(llama_folder, **GPU_KW, sparse_attention=path, sparse_min_context=200)
    eager_llm.engine.executor.runner.use_cuda_graphs = False
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    eager = [
        o.outputs[0].token_ids for o in eager_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    ]
    assert tokens == eager
