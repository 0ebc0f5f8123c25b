"""The closed-form AFD ratio (docs/afd_ratio.md) against the layer-level event simulation
(afd_events.py), which shares no step formula with it.

Small, fast instances (b = 8-16 sequences per attention GPU, a few hundred steps); the eight
workloads with realistic batch sizes are in benchmarks/sim_validation.py."""

import numpy as np
import pytest

from fapool.sim.afd import AFDModel, context_moments
from fapool.sim.afd_events import _fifo_done, regret_sweep, simulate_bundle
from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import AFD
from fapool.sim.workload import ClosedLoopWorkload, LengthDist

CASES = [  # (kv heads, prompt, output, b, f_tp)
    (32, "uniform:1024,3072", "uniform:50,150", 8, 2),
    (32, "fixed:4096", "uniform:20,80", 8, 1),
    (8, "fixed:8192", "uniform:100,300", 16, 4),
]


@pytest.mark.parametrize("kvh,prompt,output,b,f_tp", CASES)
def test_closed_form_ratio_has_small_regret_in_the_event_simulation(h100_cost, kvh, prompt, output, b, f_tp):
    cost = type(h100_cost)(h100_cost.model.replace(num_key_value_heads=kvh), h100_cost.hw)
    res = regret_sweep(cost, LengthDist.parse(prompt), LengthDist.parse(output), b, f_tp, steps=300, max_points=5)
    assert res["throughput_regret"] <= 0.02, res
    # The closed form's throughput at its r* is the simulated one's within a few percent.
    assert abs(res["closed_form_vs_simulated_at_r_star"]) <= 0.06, res


@pytest.mark.parametrize("overlap", [True, False])
def test_fixed_lengths_closed_form_step_matches_the_event_simulation(h100_cost, overlap):
    """No randomness (every request: 2048-token prompt, one output token): what is left
    between the two is the closed form's max-of-totals against the scheduled tasks."""
    m = context_moments(np.array([2048]), np.array([1]))
    fixed, one = LengthDist.parse("fixed:2048"), LengthDist.parse("fixed:1")
    for r in (2, 6):
        closed = AFDModel(h100_cost, m, b=16, f_tp=2, overlap=overlap).point(r).step_time
        run = simulate_bundle(h100_cost, fixed, one, r, 16, 2, overlap, steps=2)
        assert run.mean_step_s == pytest.approx(closed, rel=0.03)


def test_one_gpu_without_overlap_is_the_sum_of_its_tasks(h100_cost):
    """r = 1, b = 1, one micro-batch: a layer is attention, the transfer out, the FFN and the
    transfer back, in sequence; the step adds the LM head and the host terms."""
    cost = h100_cost
    run = simulate_bundle(cost, LengthDist.parse("fixed:1000"), LengthDist.parse("fixed:1"), 1, 1, 1, False, steps=1)
    link = cost.hw.link(True)
    net = link.latency + cost.hidden_bytes(1) / link.bandwidth
    attn = cost.qkv_proj(1) + cost.attention(1001, 1001, 1) + cost.o_proj(1) + cost.layer_misc(1)
    layer = attn + net + cost.ffn(1) + net
    L = cost.model.num_hidden_layers
    expected = (L - 1) * layer + attn + net + cost.ffn(1) + cost.lm_head(1)
    assert run.mean_step_s == pytest.approx(float(cost.finish_step(expected, 1, 1001)), rel=1e-9)


def test_fifo_link_waits_for_its_last_sender():
    # Free at 0; jobs ready at 0 and 10 taking 4 each: the second ends at 14.
    assert _fifo_done(np.array([10.0, 0.0]), np.array([4.0, 4.0]), 0.0) == 14.0
    # Busy until 20: both queue behind it.
    assert _fifo_done(np.array([10.0, 0.0]), np.array([4.0, 4.0]), 20.0) == 28.0


def test_stragglers_cost_throughput(gqa_cost):
    """The same mean context, with and without spread: the slowest attention GPU sets each
    layer's pace, so variance costs throughput."""
    out = LengthDist.parse("fixed:200")
    even = simulate_bundle(gqa_cost, LengthDist.parse("fixed:4096"), out, 8, 8, steps=100)
    spread = simulate_bundle(gqa_cost, LengthDist.parse("uniform:512,7680"), out, 8, 8, steps=100)
    assert spread.throughput_per_gpu < even.throughput_per_gpu


def test_closed_form_optimum_is_a_peak(h100_cost):
    """Theta(r) rises to r* and falls after it (the scan stops well past the peak)."""
    m = context_moments(np.full(1000, 8192), np.full(1000, 512))
    gqa = type(h100_cost)(h100_cost.model.replace(num_key_value_heads=8), h100_cost.hw)
    plan = AFDModel(gqa, m, b=64, f_tp=4).optimise()
    curve = {p.r: p.throughput_per_gpu for p in plan.curve}
    assert (
        curve[plan.best.r] > curve[int(plan.best.r * 0.8)]
        and curve[plan.best.r] > curve[int(plan.best.r * 1.2)]
    )


def test_simulated_bundle_stays_full_and_has_no_preemption(h100_cost):
    p, o = LengthDist.parse("uniform:1024,3072"), LengthDist.parse("uniform:50,150")
    r = simulate(
        AFD(r=4, f_tp=1, max_batch_per_attn=8),
        h100_cost,
        ClosedLoopWorkload(p, o, 32, 10**6),
        SimConfig(prefill="skip", max_sim_time=0.2),
    )
    assert r.preemptions == 0 and min(n for _, n, _, _ in r.timeline[0]) == 32
