"""The host model and the calibrated small-size terms of the cost model: the fits recover known
coefficients, the step composition is what docs/simulator.md says, and `calibrate` on the CPU
writes the new fields, which load back into a profile."""

import json

import numpy as np
import pytest

from fapool.bench.calibrate import calibrate, engine_twin, tiny_twin
from fapool.config import ModelConfig
from fapool.sim.calibrate import (
    apply_calibration,
    attn_table,
    fit_gemm_by_m,
    fit_host,
    fit_launch,
    fit_nonneg,
    load_calibration,
)
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HostProfile, get_hardware
from fapool.sim.strategies import FAPool, StaticTPPP
from fapool.sim.validate import predict_step


def predict_tpot(cost, batch, context):
    """A single process's decode step."""
    return predict_step(cost, StaticTPPP(tp=1, pp=1), batch, context).duration

TINY_KERNELS = {
    "gemm_m": [1, 4],
    "gemm_nk": [(64, 64), (128, 64)],
    "decode": [(1, 2, 16, 16), (2, 2, 64, 16)],
    "prefill": [(1, 2, 32, 16)],
    "comm_bytes": [1024],
}
TINY_ENGINE = {"layers": (1, 2), "batches": (1, 3), "contexts": (8, 40), "steps": 3, "warmup": 1, "repeats": 1}


def test_fit_host_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 65, 24).astype(float)
    kv = n * rng.integers(64, 16384, 24)
    true = (4.0e-4, 1.5e-5, 4.0e-9)
    host = true[0] + true[1] * n + true[2] * kv
    fit = fit_host(n, kv, host)
    assert (fit["step_s"], fit["per_seq_s"], fit["per_kv_token_s"]) == pytest.approx(true, rel=1e-6)
    assert fit["mean_abs_rel_err"] < 1e-9
    # 3% multiplicative noise still lands close.
    noisy = fit_host(n, kv, host * (1 + 0.03 * rng.standard_normal(24)))
    assert noisy["per_seq_s"] == pytest.approx(true[1], rel=0.25)
    assert noisy["per_kv_token_s"] == pytest.approx(true[2], rel=0.25)
    with pytest.raises(SimInputError, match="at least 3"):
        fit_host([1, 2], [10, 20], [1e-3, 2e-3])


def test_fit_nonneg_never_returns_a_negative_term():
    x = np.stack([np.ones(6), np.arange(6.0), np.arange(6.0) ** 2], axis=1)
    y = 2.0 - 0.3 * np.arange(6.0) + 0.5 * np.arange(6.0) ** 2  # the middle term is negative
    c = fit_nonneg(x, y)
    assert np.all(c >= 0)
    assert c[1] == 0.0
    # Nothing negative in the truth: the plain least-squares answer.
    assert fit_nonneg(x, 1.0 + 2.0 * np.arange(6.0)) == pytest.approx([1.0, 2.0, 0.0], abs=1e-9)
    launch = fit_launch([1, 3], [120e-6, 300e-6])
    assert launch == pytest.approx({"launch_step_s": 30e-6, "launch_layer_s": 90e-6})


def _cost(**host_kw) -> CostModel:
    hw = get_hardware("h100").replace(layer_fixed_s=10e-6, step_fixed_s=30e-6, host=HostProfile(**host_kw))
    return CostModel(load_model_config("seed000"), hw)


def test_finish_step_composes_host_launch_and_device():
    host = dict(step_s=300e-6, per_seq_s=10e-6, per_kv_token_s=2e-9, launch_layer_s=1e-3, launch_step_s=1e-4)
    cost = _cost(**host, cuda_graphs=True, launch_overlaps_device=True)
    serial = 300e-6 + 8 * 10e-6 + 8000 * 2e-9
    dev = 1e-3
    # Graph step: device (+ fixed step cost) + serial host; the graph launch is in step_s.
    assert cost.finish_step(dev, 8, 8000, graphs=True) == pytest.approx(dev + 30e-6 + serial)
    # Eager on a GPU: 4 layers launch in 4.1 ms, which hides the 1 ms of device work.
    assert cost.finish_step(dev, 8, 8000, graphs=False) == pytest.approx(serial + 4 * 1e-3 + 1e-4)
    # Launches that do not overlap (a CPU): everything adds.
    sync = _cost(**host, cuda_graphs=False, launch_overlaps_device=False)
    assert sync.finish_step(dev, 8, 8000, graphs=True) == pytest.approx(serial + dev + 30e-6 + 4.1e-3)
    # Async scheduling: a graph step's serial host work overlaps the device's.
    overlap = _cost(**host, cuda_graphs=True, launch_overlaps_device=True, async_scheduling=True)
    assert overlap.finish_step(dev, 8, 8000, graphs=True) == pytest.approx(max(dev + 30e-6, serial))
    assert overlap.finish_step(1e-5, 8, 8000, graphs=True) == pytest.approx(serial)  # host-bound
    # Device only: no host at all; the fixed step cost stays (it is device time).
    assert cost.device_only().finish_step(dev, 8, 8000, graphs=True) == pytest.approx(dev + 30e-6)
    assert cost.device_only().finish_step(dev, 8, 8000) == pytest.approx(dev + 30e-6)  # nor launches
    # The decode prediction: whole = device + host for a single-GPU graph step.
    whole, gpu = predict_tpot(cost, 8, 1000), predict_tpot(cost.device_only(), 8, 1000)
    assert whole - gpu == pytest.approx(cost.hw.host.serial(8, 8 * 1001))
    # layer_fixed_s is paid once per layer (and per micro-batch).
    plain = CostModel(cost.model, cost.hw.replace(layer_fixed_s=0.0), include_host=False)
    assert gpu - predict_tpot(plain, 8, 1000) == pytest.approx(4 * 10e-6)
    with pytest.raises(SimInputError, match="host field"):
        HostProfile(per_seq_s=-1.0)


def test_gemm_rates_by_m_interpolate_in_log_m():
    # m = 1 and 4 memory-bound (a CPU's GEMV is fast, its packed small-m GEMM slow), m = 64
    # compute-bound.
    hw = get_hardware("cpu").replace(gemm_by_m=((1, 16e9, 16e9), (4, 32e9, 4e9), (64, 64e9, 8e9)), kernel_overhead=0.0)
    cost = CostModel(load_model_config("seed000"), hw)
    assert cost.gemm_rates(4) == pytest.approx((32e9, 4e9))
    f2, b2 = cost.gemm_rates(2)  # halfway in log m: geometric means
    assert f2 == pytest.approx(np.sqrt(16e9 * 32e9)) and b2 == pytest.approx(8e9)
    assert cost.gemm_rates(1000) == pytest.approx((64e9, 8e9))  # clamped
    n = k = 1024
    assert cost.gemm(4, n, k) == pytest.approx(max(2 * 4 * n * k / 32e9, (4 * k + k * n + 4 * n) * 4 / 4e9))
    np.testing.assert_allclose(cost.gemm(np.array([0.0, 4.0]), n, k), [0.0, cost.gemm(4, n, k)])
    # The fit recovers per-m rates from samples priced by them.
    samples = [
        {"m": m, "flops": 2.0 * m * nn * kk, "bytes": (m * kk + kk * nn + m * nn) * 4.0,
         "s": 2e-6 + cost.gemm(m, nn, kk)}
        for m in (1, 4, 64) for nn, kk in ((256, 256), (1024, 1024), (4096, 1024))
    ]
    by_m = {r["m"]: r for r in fit_gemm_by_m(samples, 2e-6)}
    assert by_m[1]["bytes_per_s"] == pytest.approx(16e9, rel=0.02)
    assert by_m[64]["flops_per_s"] == pytest.approx(64e9, rel=0.02)


def test_attention_table_interpolates_and_extrapolates():
    table = attn_table([{"bytes": 1e6, "s": 1e-3}, {"bytes": 1e8, "s": 1e-2}, {"bytes": 1e7, "s": 2e-3},
                        {"bytes": 1e7, "s": 4e-3}, {"bytes": 5e7, "s": 2e-3}])
    assert table == ((1e6, 1e-3), (1e7, 3e-3), (5e7, 3e-3), (1e8, 1e-2))  # averaged, non-decreasing
    cost = CostModel(load_model_config("seed000"), get_hardware("cpu").replace(attn_by_bytes=table))
    assert cost._attn_table(1e6) == pytest.approx(1e-3)
    assert cost._attn_table(1e3) == pytest.approx(1e-3)  # the fixed cost floor
    assert cost._attn_table(np.sqrt(1e6 * 1e7)) == pytest.approx(np.sqrt(1e-3 * 3e-3))
    assert cost._attn_table(4e8) == pytest.approx(4e-2)  # the largest sample's rate beyond it
    kv = 1e8 / cost.kv_bytes_per_token_layer()
    assert cost.attention(kv, kv, 0) == pytest.approx(1e-2, rel=1e-6)
    assert float(cost.attention(np.array([kv]), np.array([kv]), np.array([0.0]))[0]) == pytest.approx(1e-2, rel=1e-6)


def test_pool_step_prediction_uses_the_pool_only_past_the_threshold():
    cost = CostModel(load_model_config("seed000"), get_hardware("h100"), include_host=False)
    below = FAPool(base_tp=1, pool_size=2, threshold=4096, tokens_per_worker=1024, max_batch=8)
    assert predict_step(cost, below, 8, 2000).duration == pytest.approx(predict_tpot(cost, 8, 2000), rel=1e-9)
    # Past the threshold the base attends to 4096 tokens and two workers split the rest.
    far = predict_step(cost, below, 8, 32768).duration
    assert far < predict_tpot(cost, 8, 32768)
    with pytest.raises(ValueError, match="do not fit"):
        predict_step(cost, FAPool(base_tp=1, pool_size=0, threshold=10, max_batch=8), 8, 100)


def test_tiny_twin_keeps_the_architecture_flags():
    seed = load_model_config("seed000")
    twin = tiny_twin(seed, 3)
    assert (twin.architecture, twin.hidden_act, twin.gated_mlp, twin.num_hidden_layers) == ("seed-gelu", "gelu", False, 3)
    gqa = tiny_twin(seed.replace(num_key_value_heads=8), 1)
    assert gqa.num_attention_heads // gqa.num_key_value_heads == 4
    assert isinstance(tiny_twin(None, 2), ModelConfig) and tiny_twin(None, 2).gated_mlp


def test_engine_twin_model_is_the_target_cut_to_depth():
    seed = load_model_config("seed000")
    cut = engine_twin(seed, 3, "model")
    assert cut == seed.replace(num_hidden_layers=3) and cut.hidden_size == seed.hidden_size
    assert engine_twin(seed, 3, "tiny") == tiny_twin(seed, 3)
    with pytest.raises(SimInputError, match="needs the target"):
        engine_twin(None, 3, "model")
    with pytest.raises(SimInputError, match="one of"):
        engine_twin(seed, 3, "wide")


def test_calibrate_on_cpu_writes_the_engine_terms_and_they_load_back(tmp_path):
    cal = calibrate(device="cpu", grid=TINY_KERNELS, collectives=False, threads=1, engine_grid=TINY_ENGINE)
    eng = cal["engine"]
    assert len(eng["samples"]) == 2 * 2 * 2  # depths x batches x contexts
    for key in ("step_s", "per_seq_s", "per_kv_token_s", "launch_layer_s", "launch_step_s"):
        assert eng["host"][key] >= 0
    assert eng["host"]["cuda_graphs"] is False and eng["host"]["launch_overlaps_device"] is False
    assert eng["device_fixed"]["layer_fixed_s"] >= 0 and eng["device_fixed"]["step_fixed_s"] >= 0
    assert all(s["step_s"] > s["device_s"] > 0 for s in eng["samples"])
    assert [r["m"] for r in cal["gemm"]["by_m"]] == [1, 4]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    hw = apply_calibration(get_hardware("cpu"), load_calibration(path))
    assert hw.host is not None and hw.host.per_seq_s == eng["host"]["per_seq_s"]
    assert hw.layer_fixed_s == eng["device_fixed"]["layer_fixed_s"]
    assert hw.step_fixed_s == eng["device_fixed"]["step_fixed_s"]
    assert len(hw.gemm_by_m) == 2 and len(hw.attn_by_bytes) == 2
    cost = CostModel(load_model_config("seed000"), hw)
    assert predict_tpot(cost, 4, 100) > predict_tpot(cost.device_only(), 4, 100)
    # A kernels-only file (engine null) loads without a host model; an older schema is refused.
    (tmp_path / "kernels.json").write_text(json.dumps(cal | {"engine": None}))
    assert apply_calibration(get_hardware("cpu"), load_calibration(tmp_path / "kernels.json")).host is None
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in cal.items() if k != "engine"} | {"schema": 1}))
    with pytest.raises(SimInputError, match="schema 3"):
        load_calibration(tmp_path / "old.json")


def test_engine_calibration_fits_the_depth_slope_over_three_depths():
    from fapool.bench.calibrate import calibrate_engine

    hw = get_hardware("cpu")
    out = calibrate_engine("cpu", hw, grid={**TINY_ENGINE, "layers": (1, 2, 4)})
    assert sorted({s["layers"] for s in out["samples"]}) == [1, 2, 4]
    assert "layers 1, 2, 4" in out["model"]
    fixed = out["device_fixed"]
    assert len(fixed["layer_residuals_s"]) == len(TINY_ENGINE["batches"]) * len(TINY_ENGINE["contexts"])
    assert fixed["layer_fixed_s"] >= 0 and fixed["step_fixed_s"] >= 0


def test_a_failing_engine_run_keeps_the_kernel_calibration():
    saved = []
    bad = {**TINY_ENGINE, "layers": (2, 1)}
    cal = calibrate(device="cpu", grid=TINY_KERNELS, collectives=False, engine_grid=bad, checkpoint=saved.append)
    assert saved and cal["engine"] is None and "two or more depths" in cal["engine_error"]
    assert apply_calibration(get_hardware("cpu"), cal).host is None


def test_predict_step_spreads_afd_over_its_attention_ranks():
    """AFD spreads the batch over its attention ranks (two ranks: each reads half the KV, so
    attention is cheaper a rank)."""
    from fapool.sim.strategies import AFD

    cost = CostModel(load_model_config("seed000"), get_hardware("h100"), include_host=False)
    one, two = (predict_step(cost, AFD(r=r, f_tp=1, max_batch_per_attn=8), 8, 16000) for r in (1, 2))
    assert two.busy[:2].max() < one.busy[0] and len(two.busy) == 3
