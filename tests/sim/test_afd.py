"""The closed-form AFD ratio (docs/afd_ratio.md) against the simulator's sweep optimum.

Small, fast instances (b = 8-16 sequences per attention GPU, 600 steps); the full set of eight
workloads with realistic batch sizes is in benchmarks/sim_validation.py."""

import numpy as np
import pytest

from fapool.sim.afd import AFDModel, simulate_ratio, sweep_ratio
from fapool.sim.queueing import context_moments
from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import AFD, StepBatch
from fapool.sim.workload import LengthDist

CASES = [  # (kv heads, prompt, output, b, f_tp)
    (32, "uniform:1024,3072", "uniform:50,150", 8, 2),
    (32, "fixed:4096", "uniform:20,80", 8, 1),
    (8, "fixed:8192", "uniform:100,300", 16, 4),
]


@pytest.mark.parametrize("kvh,prompt,output,b,f_tp", CASES)
def test_closed_form_ratio_matches_simulated_optimum(h100_cost, kvh, prompt, output, b, f_tp):
    cost = type(h100_cost)(h100_cost.model.replace(num_key_value_heads=kvh), h100_cost.hw)
    res = sweep_ratio(
        cost, LengthDist.parse(prompt), LengthDist.parse(output), b, f_tp, steps=500, max_points=5, span=0.15
    )
    assert res["rel_error"] <= 0.05, res
    assert res["throughput_regret"] <= 0.01
    # The closed-form throughput curve tracks the simulated one point by point.
    for r, sim in res["simulated_curve"].items():
        assert res["closed_form_curve"][r] == pytest.approx(sim, rel=0.03)


def test_step_time_matches_the_simulator_for_fixed_lengths(h100_cost):
    """No randomness in the contexts (every request: 2048-token prompt, one output token, so
    every step reads exactly 2049 tokens a sequence): the closed form is the simulator's step."""
    m = context_moments(np.array([2048]), np.array([1]))
    assert m.mean == 2049 and m.var == 0
    for overlap in (True, False):
        model = AFDModel(h100_cost, m, b=16, f_tp=2, overlap=overlap)
        bundle = AFD(r=6, f_tp=2, max_batch_per_attn=16, overlap=overlap)
        n = 6 * 16
        batch = StepBatch(
            np.full(n, 2048), np.ones(n, np.int64), np.ones(n, bool), np.repeat(np.arange(6), 16)
        )
        assert model.point(6).step_time == pytest.approx(
            bundle.step_cost(h100_cost, batch, None).duration, rel=1e-9
        )


def test_landmarks_bracket_the_optimum(h100_cost):
    """With low-variance contexts and a cheap FFN instance the optimum sits at the balance
    point, where the FFN side's total (compute + both transfers + LM head) meets attention."""
    m = context_moments(np.full(1000, 8192), np.full(1000, 512))
    gqa = type(h100_cost)(h100_cost.model.replace(num_key_value_heads=8), h100_cost.hw)
    plan = AFDModel(gqa, m, b=64, f_tp=4).optimise()
    assert plan.best.r == pytest.approx(plan.balance_ratio, rel=0.05)
    curve = {p.r: p.throughput_per_gpu for p in plan.curve}
    assert (
        curve[plan.best.r] > curve[int(plan.best.r * 0.8)]
        and curve[plan.best.r] > curve[int(plan.best.r * 1.2)]
    )


def test_simulated_bundle_stays_full_and_has_no_preemption(h100_cost):
    p, o = LengthDist.parse("uniform:1024,3072"), LengthDist.parse("uniform:50,150")
    thr = simulate_ratio(h100_cost, p, o, b=8, f_tp=1, r=4, steps=300)
    assert thr > 0
    from fapool.sim.workload import ClosedLoopWorkload

    r = simulate(
        AFD(r=4, f_tp=1, max_batch_per_attn=8),
        h100_cost,
        ClosedLoopWorkload(p, o, 32, 10**6),
        SimConfig(prefill="skip", max_sim_time=0.2),
    )
    assert r.preemptions == 0 and min(n for _, n, _, _ in r.timeline[0]) == 32
