import math
import time

import numpy as np
import pytest

from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import AFD, FAPool, StaticTPPP, head_parallel
from fapool.sim.workload import ClosedLoopWorkload, LengthDist, PoissonWorkload


def _poisson(rate=20.0, n=300, prompt="lognormal:2048,0.8", output="exp:64", seed=0):
    return PoissonWorkload(
        LengthDist.parse(prompt, hi=16384), LengthDist.parse(output, hi=2048), rate, n, seed
    )


def test_deterministic_under_a_seed(h100_cost):
    s = FAPool(base_tp=8, pool_size=8, max_batch=128)
    a = simulate(s, h100_cost, _poisson(seed=4)).summary()
    b = simulate(s, h100_cost, _poisson(seed=4)).summary()
    assert a == b
    c = simulate(s, h100_cost, _poisson(seed=5)).summary()
    assert c["tpot_s"] != a["tpot_s"]


@pytest.mark.parametrize(
    "strategy",
    [
        StaticTPPP(tp=8, pp=2),
        FAPool(base_tp=8, pool_size=8, threshold=1024, max_batch=64),
        AFD(r=4, f_tp=1, max_batch_per_attn=16),
        head_parallel(dense_tp=4, attn_workers=8, max_batch=64),
        StaticTPPP(tp=2, pp=1, replicas=3, max_batch=32),
    ],
    ids=lambda s: s.name + str(s.total_gpus()),
)
def test_every_token_is_generated_once(h100_cost, strategy):
    wl = _poisson()
    r = simulate(strategy, h100_cost, wl)
    assert r.requests_finished == r.requests_total == 300
    assert r.output_tokens == int(wl.initial().output_len.sum())
    assert len(r.tpot) > 0 and (r.tpot > 0).all() and (r.ttft > 0).all()
    assert (r.e2e >= r.ttft).all()
    assert (r.gpu_util >= 0).all() and (r.gpu_util + r.gpu_comm <= 1 + 1e-9).all()
    assert r.num_gpus == strategy.total_gpus() == len(r.gpu_labels)


def test_single_request_latency_is_the_step_times(h100_cost):
    """One request alone: TTFT = its prefill step, TPOT = mean of its decode steps."""
    s = StaticTPPP(tp=8, pp=1)
    wl = PoissonWorkload(LengthDist.parse("1000"), LengthDist.parse("11"), 1.0, 1)
    r = simulate(s, h100_cost, wl, SimConfig(max_num_batched_tokens=4096, max_macro_steps=1))
    prefill = s.timing(h100_cost, 1, 1000, 1000, 1000 * 1001 / 2)[0]
    decode = [s.timing(h100_cost, 1, 1, c + 1, c + 1)[0] for c in range(1000, 1010)]
    assert r.ttft[0] == pytest.approx(prefill, rel=1e-9)
    assert r.tpot[0] == pytest.approx(np.mean(decode), rel=1e-9)


def test_macro_steps_match_single_steps(h100_cost):
    s = FAPool(base_tp=8, pool_size=8, threshold=1024, max_batch=64)
    exact = simulate(s, h100_cost, _poisson(rate=5.0, n=150), SimConfig(max_macro_steps=1))
    fast = simulate(s, h100_cost, _poisson(rate=5.0, n=150), SimConfig(max_macro_steps=128))
    assert fast.output_tokens == exact.output_tokens
    assert np.mean(fast.tpot) == pytest.approx(np.mean(exact.tpot), rel=1e-3)
    assert np.mean(fast.ttft) == pytest.approx(np.mean(exact.ttft), rel=1e-3)
    assert fast.gpu_util.mean() == pytest.approx(exact.gpu_util.mean(), rel=1e-2)


def test_preemption_under_tight_kv(h100_cost):
    """KV for ~1.5 requests per GPU group: requests get preempted and recomputed, all finish."""
    cost = h100_cost
    hw = cost.hw.replace(memory_bytes=(cost.weight_bytes() + 2.2e9 + 3000 * cost.kv_bytes_per_token()) / 0.9)
    tight = type(cost)(cost.model, hw)
    s = StaticTPPP(tp=1, pp=1, max_batch=8)
    assert s.kv_capacity(tight) == pytest.approx(3000 + 0.2e9 / cost.kv_bytes_per_token(), rel=0.01)
    wl = PoissonWorkload(LengthDist.parse("1500"), LengthDist.parse("400"), math.inf, 6)
    r = simulate(s, tight, wl)
    assert r.preemptions > 0
    assert r.requests_finished == 6 and r.output_tokens == 6 * 400


def test_pool_unused_below_threshold_equals_tensor_parallel(h100_cost):
    wl = lambda: _poisson(prompt="uniform:100,900", output="exp:32")
    pool = simulate(FAPool(base_tp=8, pool_size=4, threshold=4096, max_batch=256), h100_cost, wl())
    tp8 = simulate(StaticTPPP(tp=8, pp=1, max_batch=256), h100_cost, wl())
    np.testing.assert_allclose(pool.tpot, tp8.tpot, rtol=1e-9)
    assert pool.gpu_util[8:].max() == 0.0  # pool workers idle


def test_seed000_scale_runs_in_seconds_and_plateaus(h100_cost):
    """The seed's setup at 16K context, batch 1024, 8 base + P pool GPUs: the pool stops
    helping once its attention time drops below the base's (around P = 24 here)."""
    wl = lambda: PoissonWorkload(LengthDist.parse("16384"), LengthDist.parse("32"), math.inf, 1024)
    tpot = {}
    t0 = time.perf_counter()
    for p in (12, 24, 32):
        r = simulate(
            FAPool(base_tp=8, pool_size=p, threshold=4096, max_batch=1024),
            h100_cost,
            wl(),
            SimConfig(prefill="skip"),
        )
        assert r.requests_finished == 1024
        tpot[p] = float(np.mean(r.tpot))
    assert time.perf_counter() - t0 < 10
    assert tpot[32] == pytest.approx(tpot[24], rel=0.03)
    assert tpot[12] > 1.2 * tpot[24]


def test_throughput_equals_offered_load_when_stable(h100_cost):
    """Flow conservation: below saturation tokens/s = arrival rate x mean output length."""
    wl = _poisson(rate=10.0, n=2000, output="exp:100")
    r = simulate(StaticTPPP(tp=8, pp=1), h100_cost, wl)
    reqs = wl.initial()
    offered = reqs.output_len.sum() / reqs.arrival[-1]
    assert r.throughput == pytest.approx(offered, rel=0.03)
    # Little's law: time-average number in system = arrival rate x mean time in system.
    in_system = r.e2e.sum() / reqs.arrival[-1]
    assert in_system == pytest.approx(10.0 * r.e2e.mean(), rel=0.02)


def test_closed_loop_keeps_the_batch_full(h100_cost):
    s = AFD(r=3, f_tp=1, max_batch_per_attn=16)
    wl = ClosedLoopWorkload(
        LengthDist.parse("uniform:500,1500"), LengthDist.parse("exp:50"), 48, 10**6, seed=2
    )
    r = simulate(s, h100_cost, wl, SimConfig(prefill="skip", max_sim_time=0.5))
    running = [n for _, n, _, _ in r.timeline[0]]
    assert min(running) == 48
    assert r.requests_finished > 100


def test_skip_prefill_gives_one_step_ttft(h100_cost):
    s = StaticTPPP(tp=8, pp=1)
    wl = PoissonWorkload(LengthDist.parse("4000"), LengthDist.parse("5"), 1.0, 3)
    r = simulate(s, h100_cost, wl, SimConfig(prefill="skip"))
    assert r.ttft == pytest.approx([s.timing(h100_cost, 1, 1, 4001, 4001)[0]] * 3, rel=1e-9)
