"""Sparse decode in the simulator: the calibrated term (a call, a row, each summary block scored,
each KV token read) counts what the engine's sparse backend does, the fit recovers known terms,
the calibration JSON carries them, and a sparse StaticTPPP step differs from the dense one by
exactly the layers' attention difference."""

import pytest
import torch

from fapool.bench.calibrate import _sparse_samples, tiny_twin
from fapool.sim.calibrate import apply_calibration, fit_sparse, load_calibration, write_calibration
from fapool.sim.cost_model import CostModel, sparse_terms
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import get_hardware
from fapool.sim.strategies import StaticTPPP
from fapool.sim.validate import predict_step

TERMS = (8e-4, 1.5e-5, 9e-7, 6e-7)  # s a call, a row, a summary block, a KV token read


def _cost(sparse=TERMS, layers=4) -> CostModel:
    model = tiny_twin(None, layers).replace(num_attention_heads=6, num_key_value_heads=3)
    return CostModel(model, get_hardware("cpu").replace(sparse_decode=sparse))


def test_sparse_terms_count_blocks_scored_and_tokens_read():
    # 1025 tokens: 65 blocks scored per KV head, ceil(0.25 x 65) = 17 read, 16 tokens each.
    assert sparse_terms(4, 1025, 0.25, 3) == (4, 4 * 3 * 65, 4 * 3 * 17 * 16)
    # Never fewer than min_blocks, never more than the row has.
    assert sparse_terms(1, 160, 0.01, 2) == (1, 2 * 10, 2 * 4 * 16)
    assert sparse_terms(1, 20, 0.01, 2) == (1, 2 * 2, 2 * 2 * 16)


def test_fit_sparse_recovers_known_terms():
    samples = []
    for b, c, f in [(b, c, f) for b in (1, 4) for c in (256, 1024, 2048) for f in (0.125, 0.5)]:
        rows, blocks, tokens = sparse_terms(b, c, f, 3)
        s = TERMS[0] + rows * TERMS[1] + blocks * TERMS[2] + tokens * TERMS[3]
        samples.append({"rows": rows, "blocks": blocks, "tokens": tokens, "s": s})
    fit = fit_sparse(samples)
    assert [fit[k] for k in ("call_s", "per_row_s", "per_block_s", "per_token_s")] == pytest.approx(TERMS, rel=1e-6)
    assert fit["mean_abs_rel_err"] < 1e-9


def test_calibration_json_carries_sparse_terms(tmp_path, cpu_calibration):
    cal = cpu_calibration
    path = tmp_path / "c.json"
    write_calibration({**cal, "sparse": dict(zip(("call_s", "per_row_s", "per_block_s", "per_token_s"), TERMS,
                                                 strict=True))}, path)
    assert apply_calibration(get_hardware("cpu"), load_calibration(path)).sparse_decode == TERMS
    write_calibration(cal, path)  # made before the sparse term: none, and a sparse step is refused
    hw = apply_calibration(get_hardware("cpu"), load_calibration(path))
    assert hw.sparse_decode == ()
    with pytest.raises(SimInputError, match="sparse"):
        predict_step(CostModel(tiny_twin(None, 2), hw), StaticTPPP(tp=1, pp=1, kv_share=0.25), 4, 1024)


def test_sparse_step_replaces_each_layers_attention_with_the_calibrated_term():
    cost = _cost()
    L, batch, ctx = cost.model.num_hidden_layers, 4, 1024
    dense = predict_step(cost, StaticTPPP(tp=1, pp=1, max_batch=batch), batch, ctx).duration
    sparse = predict_step(cost, StaticTPPP(tp=1, pp=1, max_batch=batch, kv_share=0.25), batch, ctx).duration
    kv = batch * (ctx + 1)
    want = L * (cost.sparse_attention(ctx + 1, batch, 0.25) - float(cost.attention(kv, kv, batch)))
    assert sparse - dense == pytest.approx(want, rel=1e-9)
    # More of the blocks read: a longer step, by the token term alone.
    wider = predict_step(cost, StaticTPPP(tp=1, pp=1, max_batch=batch, kv_share=0.5), batch, ctx).duration
    extra_tokens = sparse_terms(batch, ctx + 1, 0.5, 3)[2] - sparse_terms(batch, ctx + 1, 0.25, 3)[2]
    assert wider - sparse == pytest.approx(L * extra_tokens * TERMS[3], rel=1e-9)
    with pytest.raises(SimInputError, match="kv_share"):
        StaticTPPP(tp=1, pp=1, kv_share=0.0).validate(cost)


def test_sparse_samples_time_the_engines_sparse_backend():
    torch.set_num_threads(1)
    model = tiny_twin(None, 1).replace(num_attention_heads=4, num_key_value_heads=2)
    grid = [(1, 256, 0.125), (2, 512, 0.5)]
    samples = _sparse_samples(torch.device("cpu"), torch.float32, model, grid)
    for s, (b, c, f) in zip(samples, grid, strict=True):
        assert (s["rows"], s["blocks"], s["tokens"]) == sparse_terms(b, c + 1, f, 2)
        assert 0 < s["s"] < 1.0
