import numpy as np
import pytest

from fapool.sim.errors import SimInputError
from fapool.sim.planner import PlannerInputs, _kv_batch_limit, _PoolMeanField, make_plan, pool_balance_size
from fapool.sim.afd import ContextMoments
from fapool.sim.workload import LengthDist


def _inputs(cost, slo, prompt="lognormal:3000,0.6", output="exp:128", max_gpus=24):
    p, o = LengthDist.parse(prompt, hi=32768), LengthDist.parse(output, hi=4096)
    rng = np.random.default_rng(0)
    return PlannerInputs(cost, p.sample(rng, 20_000), o.sample(rng, 20_000), slo, max_gpus=max_gpus), p, o


def test_plan_sizes_every_strategy_and_the_simulator_agrees(h100_cost):
    inp, p, o = _inputs(h100_cost, 0.03)
    plan = make_plan(inp, p, o, verify_steps=150)
    kinds = [r.kind for r in plan.rows]
    assert kinds == ["static", "fapool", "head-parallel", "afd"]
    for r in plan.rows:
        assert r.tpot <= 0.9 * 0.03 + 1e-12  # planned at 90% of the SLO
        assert r.gpus <= 24
        sim_tpot = float(np.mean(r.sim.tpot))
        assert sim_tpot == pytest.approx(r.tpot, rel=0.10), r.strategy.describe()
        assert r.sim.throughput_per_gpu == pytest.approx(r.throughput_per_gpu, rel=0.10)
    rec = plan.rows[plan.recommended]
    assert rec.sim.slo_attainment(0.03) >= 0.9
    assert rec.sim.throughput_per_gpu == max(
        r.sim.throughput_per_gpu for r in plan.rows if r.sim.slo_attainment(0.03) >= 0.9
    )


def test_tighter_slo_means_smaller_batches(h100_cost):
    loose = make_plan(_inputs(h100_cost, 0.05)[0], verify_steps=0)
    tight = make_plan(_inputs(h100_cost, 0.01)[0], verify_steps=0)
    for a, b in zip(loose.rows, tight.rows, strict=True):
        assert b.tpot <= 0.01
        assert b.batch <= a.batch or b.strategy.num_gpus() != a.strategy.num_gpus()


def test_impossible_slo_is_a_clear_error(h100_cost):
    with pytest.raises(SimInputError, match="cannot be met"):
        make_plan(_inputs(h100_cost, 1e-5)[0], verify_steps=0)
    with pytest.raises(SimInputError, match="positive"):
        make_plan(_inputs(h100_cost, -1.0)[0], verify_steps=0)


def test_pool_balance_size_is_the_seed_plateau(h100_cost):
    """Seed 000's setup: 8 base GPUs, threshold 4096, batch 1024. At 16K context the pool's
    attention meets the base's at 24 GPUs (the seed reports its plateau at 24)."""
    for ctx, expected in ((16384, 24), (8192, 8)):
        x = np.full(100, ctx + 32)
        mf = _PoolMeanField(PlannerInputs(h100_cost, x, x, 1.0), x)
        assert pool_balance_size(mf, 8, 4096, 4096, 1024, 64) == expected


def test_kv_batch_limit():
    m = ContextMoments(mean=1000.0, var=250_000.0, mean_prompt=900, mean_output=200)
    b = _kv_batch_limit(m, 100_000, 3.0, 10_000)
    assert b * 1000 + 3 * 500 * np.sqrt(b) <= 100_000 < (b + 1) * 1000 + 3 * 500 * np.sqrt(b + 1)
    assert _kv_batch_limit(m, 100_000, 3.0, 10) == 10
    assert _kv_batch_limit(m, 0, 3.0, 10) == 0
