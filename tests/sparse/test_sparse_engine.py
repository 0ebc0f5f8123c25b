"""Sparse decode end to end on a tiny Llama, profiles, and calibration mechanics."""

import pytest
import torch
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.attention.torch_ref import TorchReferenceBackend
from fapool.entrypoints.cli import build_parser
from fapool.sparse.calibrate import build_profile, calibrate, load_model
from fapool.sparse.profile import SparseProfile, choose_budgets

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
    sparse, llm = _generate(llama_folder, prompts, sparse_attention=path)
    assert sparse == dense
    assert llm.engine.config.sparse_attention == path


def test_small_budget_takes_the_sparse_path(llama_folder, tmp_path):
    path = str(tmp_path / "sparse.json")
    profile = SparseProfile("tiny", 4, 0.9, 4, 2, 4, 2, [[0.2, 0.5], [0.3, 0.25]])
    profile.save(path)
    prompts = random_prompts([150, 90], seed=6)
    tokens, llm = _generate(llama_folder, prompts, sparse_attention=path)
    assert all(len(t) == 24 for t in tokens)
    backends = [layer.self_attn.backend for layer in llm.engine.runner.model.model.layers]
    read = sum(b.sparse_tokens for b in backends)
    full = sum(b.sparse_dense_tokens for b in backends)
    assert 0 < read < 0.6 * full


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
    recall = calibrate(model, windows, block_size=4, grid=grid, min_blocks=2, min_pos=32, stride=8, chunk=40)
    assert recall.shape == (2, 2, 4, 5)
    assert torch.all(recall[..., 1:] >= recall[..., :-1] - 1e-6)  # more blocks, more mass
    torch.testing.assert_close(recall[..., -1], torch.ones(2, 2, 4))
    assert bool((recall > 0).all())
    # the recorder left the model's own backends in place
    assert all(isinstance(layer.self_attn.backend, TorchReferenceBackend) for layer in model.model.layers)
    profile = build_profile(recall, grid, 0.9, 2, 4, 2, "tiny", {})
    assert profile.num_layers == 2 and all(f in grid for row in profile.kv_budget for f in row)
    assert "stability_pearson_halves" in profile.calibration


def test_cli_has_calibrate_heads_and_flag():
    ns = build_parser().parse_args(["calibrate-heads", "--windows", "2", "--target-recall", "0.9"])
    assert ns.windows == 2 and ns.target_recall == 0.9 and callable(ns.func)
    ns = build_parser().parse_args(["generate", "--sparse-attention", "p.json", "--prompt", "x"])
    assert ns.sparse_attention == "p.json"
