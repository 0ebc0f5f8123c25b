"""The attention pool's calibrated machinery costs and the CPU contention model: the fit
recovers known terms, the calibration JSON carries them (one schema), FA Pool's
pricing adds exactly what the terms say, and contention stretches only past the cores."""

import itertools

import numpy as np
import pytest

from fapool.bench.calibrate import tiny_twin
from fapool.sim.calibrate import (
    _modelled,
    apply_calibration,
    fit_pool_terms,
    load_calibration,
    write_calibration,
)
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import PoolOverheads, contention_stretch, get_hardware
from fapool.sim.strategies import FAPool
from fapool.sim.validate import pool_step_inputs, predict_step

TERMS = PoolOverheads(
    worker_call_s=8e-4, worker_per_seq_s=5e-5, driver_mb_s=1.1e-3, driver_pool_mb_s=3e-3,
    driver_route_s=1.5e-3, driver_step_s=2e-3,
)


def _cpu_cost(pool=None, cores=None, layers=4) -> CostModel:
    hw = get_hardware("cpu").replace(pool=pool, cpu_cores=cores)
    return CostModel(tiny_twin(None, layers), hw)


def _pool(workers: int, mb: int, batch: int = 4) -> FAPool:
    return FAPool(base_tp=1, pool_size=workers, threshold=32, tokens_per_worker=32, mode="shard",
                  overlap=mb > 1, max_batch=batch)


def _synthetic_samples(terms: PoolOverheads, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Samples as calibrate_pool records them, made from the cost model plus `terms`."""
    rng = np.random.default_rng(seed)
    base = _cpu_cost(PoolOverheads())
    out = []
    for layers, (workers, mb), batch, ctx in itertools.product((4, 12), ((1, 1), (1, 2), (2, 1)), (2, 4), (16, 80)):
        s = {"layers": layers, "workers": workers, "micro_batches": mb, "batch": batch, "context_mean": ctx,
             "threshold": 32, "tokens_per_worker": 32}
        c = CostModel(base.model.replace(num_hidden_layers=layers), base.hw)
        driver, wbusy, calls, seqs, routes, pool_mbs, n_mb = _modelled(c, s)
        d = driver + c.step_overhead() + layers * terms.driver_layer(n_mb, pool_mbs, routes) + terms.driver_step_s
        s["driver_busy_s"] = d * (1 + noise * rng.standard_normal())
        s["worker_attention_s"] = {
            str(w + 1): (float(wbusy[w]) + layers * terms.worker_calls(calls[w], seqs[w])) * (1 + noise * rng.standard_normal())
            for w in range(workers)
        }
        out.append(s)
    return out


def test_fit_pool_terms_recovers_known_coefficients():
    fit = fit_pool_terms(_synthetic_samples(TERMS), _cpu_cost(PoolOverheads()))
    for name in ("worker_call_s", "worker_per_seq_s", "driver_mb_s", "driver_pool_mb_s", "driver_route_s",
                 "driver_step_s"):
        assert fit[name] == pytest.approx(getattr(TERMS, name), rel=1e-6, abs=1e-9), name
    # 3% noise on every measurement still lands near the large terms.
    noisy = fit_pool_terms(_synthetic_samples(TERMS, noise=0.03, seed=1), _cpu_cost(PoolOverheads()))
    assert noisy["driver_pool_mb_s"] == pytest.approx(TERMS.driver_pool_mb_s, rel=0.3)
    assert noisy["worker_call_s"] == pytest.approx(TERMS.worker_call_s, rel=0.3)


def test_fit_pool_terms_needs_samples():
    with pytest.raises(SimInputError, match="at least 3"):
        fit_pool_terms(_synthetic_samples(TERMS)[:2], _cpu_cost(PoolOverheads()))


def _minimal_cal(**extra) -> dict:
    return {
        "schema": 3,
        "device_kind": "cpu",
        "device_name": "test",
        "dtype_bytes": 4,
        "gemm": {"flops_per_s": 5e10, "bytes_per_s": 4e9, "overhead_s": 1e-5},
        "attention": {"flops_per_s": 1e9, "bytes_per_s": 1e9, "overhead_s": 4e-4},
        "engine": None,
        "pool": None,
        "cpu_cores": None,
        **extra,
    }


def test_calibration_json_round_trips_pool_terms(tmp_path):
    pool = {f: getattr(TERMS, f) for f in TERMS.__dataclass_fields__}
    new = tmp_path / "new.json"
    write_calibration(_minimal_cal(pool={**pool, "samples": [], "seconds": 1.0}, cpu_cores=3), new)
    hw = apply_calibration(get_hardware("cpu"), load_calibration(new))
    assert hw.pool == TERMS and hw.cpu_cores == 3
    bare = tmp_path / "bare.json"
    write_calibration(_minimal_cal(), bare)  # no pool terms, no cores recorded
    hw_bare = apply_calibration(get_hardware("cpu"), load_calibration(bare))
    assert hw_bare.pool is None and hw_bare.cpu_cores is None
    missing = tmp_path / "missing.json"
    write_calibration({k: v for k, v in _minimal_cal().items() if k != "pool"}, missing)
    with pytest.raises(SimInputError, match="missing pool"):
        load_calibration(missing)
    # A GPU calibration never turns contention on, whatever it records.
    gpu = tmp_path / "gpu.json"
    write_calibration({**_minimal_cal(cpu_cores=2), "device_kind": "cuda"}, gpu)
    assert apply_calibration(get_hardware("h100"), load_calibration(gpu)).cpu_cores is None


def test_pool_overheads_reject_negative_terms():
    with pytest.raises(SimInputError, match="worker_call_s"):
        PoolOverheads(worker_call_s=-1e-6)


def test_contention_stretches_only_past_the_cores():
    assert contention_stretch(3, None) == 1.0
    assert contention_stretch(2, 2) == 1.0
    assert contention_stretch(1, 2) == 1.0
    assert contention_stretch(3, 2) == pytest.approx(1.5)
    assert contention_stretch(4, 2) == pytest.approx(2.0)


def test_contention_in_fapool_pricing():
    def step(workers, mb, cores):
        return predict_step(_cpu_cost(TERMS, cores), _pool(workers, mb), 4, 80)

    # Overlapped: driver + 2 workers = 3 busy processes; on 2 cores they share them.
    free, shared = step(2, 2, None), step(2, 2, 2)
    assert shared.duration > free.duration
    assert shared.busy[1:] == pytest.approx(1.5 * free.busy[1:])
    # The driver loses (s - 1) x the busiest worker's work a layer, done later.
    assert shared.busy[0] - free.busy[0] == pytest.approx(0.5 * free.busy[1:].max())
    assert step(2, 2, 3).duration == free.duration  # enough cores
    # Without overlap the driver waits: 2 busy workers fit 2 cores.
    assert step(2, 1, 2).duration == step(2, 1, None).duration
    # One worker with overlap: 2 processes on 2 cores, no stretch.
    assert step(1, 2, 2).duration == step(1, 2, None).duration


def test_gpu_pricing_unchanged_by_the_new_fields(h100_cost):
    pool = FAPool(base_tp=8, pool_size=4, threshold=2048, tokens_per_worker=2048, max_batch=64)
    before = predict_step(h100_cost, pool, 64, 8192)
    assert h100_cost.hw.pool is None and h100_cost.hw.cpu_cores is None
    same = CostModel(h100_cost.model, h100_cost.hw.replace(pool=None, cpu_cores=None))
    after = predict_step(same, pool, 64, 8192)
    assert after.duration == before.duration
    assert np.array_equal(after.busy, before.busy)


def test_fapool_pricing_adds_exactly_the_pool_terms():
    L = 4
    for workers, mb in ((1, 1), (2, 1), (1, 2), (2, 2)):
        zero = predict_step(_cpu_cost(PoolOverheads(), layers=L), _pool(workers, mb), 4, 80)
        with_terms = predict_step(_cpu_cost(TERMS, layers=L), _pool(workers, mb), 4, 80)
        step, ledger = pool_step_inputs(_cpu_cost(TERMS, layers=L), _pool(workers, mb), 4, 80)
        calls, seqs, routes, pool_mbs, n_mb = _pool(workers, mb).pool_calls(step, ledger)
        assert routes == workers * mb and pool_mbs == mb and n_mb == mb
        extra_w = L * TERMS.worker_calls(calls, seqs)
        assert with_terms.busy[1:] == pytest.approx(zero.busy[1:] + extra_w)
        extra_d = L * TERMS.driver_layer(n_mb, pool_mbs, routes) + TERMS.driver_step_s
        assert with_terms.busy[0] == pytest.approx(zero.busy[0] + extra_d)
        assert with_terms.duration > zero.duration
    # One micro-batch and zero terms price as before the pool terms existed.
    none = predict_step(_cpu_cost(None, layers=L), _pool(2, 1), 4, 80)
    zero = predict_step(_cpu_cost(PoolOverheads(), layers=L), _pool(2, 1), 4, 80)
    assert none.duration == pytest.approx(zero.duration)


def test_pool_terms_reach_the_planner_through_a_calibration(tmp_path):
    """`fapool plan` prices FA Pool with apply_calibration's profile: a calibration's pool
    terms (and, past the cores, contention) make the planner's pool step slower, by at least
    the driver's serial terms when there is no overlap."""
    from fapool.sim.planner import PlannerInputs, _PoolMeanField

    pool = {f: getattr(TERMS, f) for f in TERMS.__dataclass_fields__}
    new, old = tmp_path / "new.json", tmp_path / "bare.json"
    write_calibration(_minimal_cal(pool=pool, cpu_cores=2), new)
    write_calibration(_minimal_cal(), old)
    model = load_model_config("seed000").replace(num_hidden_layers=4)
    x = np.full(64, 600.0)
    for overlap in (False, True):
        s = FAPool(base_tp=1, pool_size=2, threshold=256, tokens_per_worker=256, overlap=overlap, max_batch=8)
        steps = []
        for path in (old, new):
            cost = CostModel(model, apply_calibration(get_hardware("cpu"), load_calibration(path)))
            steps.append(_PoolMeanField(PlannerInputs(cost, x, x, 1.0), x).step(s, 8))
        assert steps[1] > steps[0]
        if not overlap:
            serial = 4 * TERMS.driver_layer(1, 1, 2) + TERMS.driver_step_s
            assert steps[1] - steps[0] >= serial * 0.999
