"""TP, PP, AFD and pool ranks' calibrated exchange costs (RankOverheads): the engine's pipeline fills
and drains within a step, each term adds exactly what it says and only where calibrated, the fit
recovers known terms, and the calibration JSON carries them."""

import itertools

import pytest

from fapool.bench.calibrate import tiny_twin
from fapool.sim.calibrate import (
    apply_calibration,
    fit_rank_terms,
    load_calibration,
    rank_strategy,
    write_calibration,
)
from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import RankOverheads, get_hardware
from fapool.sim.strategies import AFD, FAPool, StaticTPPP
from fapool.sim.validate import predict_step

TERMS = RankOverheads(exchange_s=1.2e-4, concurrent_stretch=1.3, allreduce_extra_s=((2, 3e-4),),
                      step_extra_s=((2, 6e-4),), pool_extra_s=((1, 5e-5, 1e-3), (2, 2e-4, 3e-3)),
                      pp_extra_s=((2, 1e-4, 2e-3),), pool_mb2_extra_s=((2, 4e-4, 5e-3),))


def _cpu_cost(ranks=None, cores=None, layers=4) -> CostModel:
    model = tiny_twin(None, layers).replace(num_attention_heads=4, num_key_value_heads=2)
    return CostModel(model, get_hardware("cpu").replace(ranks=ranks, cpu_cores=cores))


def test_pipeline_fills_and_drains_within_a_step(h100_cost):
    """pp stages, pp micro-batches: (2 pp - 1) stage times, the last stage's LM head for each."""
    cost = h100_cost.device_only()
    L, pp, batch = cost.model.num_hidden_layers, 2, 8
    kv = batch * 1025
    period = StaticTPPP(tp=1, pp=pp).timing(cost, batch, batch, kv, kv)[0]
    dense_c, _ = cost.dense_layer(batch / pp)
    stage = L // pp * (dense_c + float(cost.attention(kv / pp, kv / pp, batch / pp)))
    hop = float(cost.p2p(cost.hidden_bytes(batch / pp), True))
    lm = float(cost.lm_head(batch / pp))
    assert period == pytest.approx((2 * pp - 1) * (stage + hop) + pp * lm + cost.step_overhead(), rel=1e-9)


def test_rank_terms_add_exactly_what_they_say():
    base, with_x = _cpu_cost(), _cpu_cost(RankOverheads(exchange_s=1e-3))
    L = base.model.num_hidden_layers
    serial = AFD(r=1, f_tp=1, max_batch_per_attn=4, overlap=False)
    grown = predict_step(with_x, serial, 4, 50).duration - predict_step(base, serial, 4, 50).duration
    assert grown == pytest.approx(2 * L * 1e-3)  # a send and a receive a layer on each side, in turn
    # The all-reduce's extra applies at its own rank count only.
    with_ar = _cpu_cost(RankOverheads(allreduce_extra_s=((2, 5e-4),)))
    assert with_ar.allreduce(1e3, 2) - base.allreduce(1e3, 2) == pytest.approx(5e-4)
    assert with_ar.allreduce(1e3, 4) == base.allreduce(1e3, 4)
    # Ranks computing at once: the calibrated stretch, times core sharing past the cores.
    shared = _cpu_cost(RankOverheads(concurrent_stretch=1.3), cores=2)
    assert [shared.concurrency(n) for n in (1, 2, 3)] == pytest.approx([1.0, 1.3, 1.95])
    assert base.concurrency(3) == 1.0 and base.exchange() == 0.0  # nothing measured: no change
    # A step of n processes adds its own extra once; the single process nothing.
    stepped = _cpu_cost(RankOverheads(step_extra_s=((2, 2e-3),)))
    tp2, single = StaticTPPP(tp=2, pp=1, max_batch=4), StaticTPPP(tp=1, pp=1, max_batch=4)
    grown = predict_step(stepped, tp2, 4, 50).duration - predict_step(base, tp2, 4, 50).duration
    assert grown == pytest.approx(2e-3)
    assert predict_step(stepped, single, 4, 50).duration == predict_step(base, single, 4, 50).duration
    # PP's own extra at its stage count, a layer and a step; not at other counts, nor for TP.
    piped = _cpu_cost(RankOverheads(pp_extra_s=((2, 1e-4, 2e-3),)))
    grown = lambda s: predict_step(piped, s, 4, 50).duration - predict_step(base, s, 4, 50).duration
    assert grown(StaticTPPP(tp=1, pp=2, max_batch=4)) == pytest.approx(L * 1e-4 + 2e-3)
    assert grown(StaticTPPP(tp=1, pp=4, max_batch=4)) == 0.0 and grown(tp2) == 0.0


def test_pool_extra_adds_per_layer_and_step_at_its_worker_count_and_micro_batches():
    base, pooled = _cpu_cost(), _cpu_cost(RankOverheads(pool_extra_s=((2, 2e-4, 3e-3),)))
    L = base.model.num_hidden_layers

    def grown(workers: int, mode: str, overlap: bool) -> float:
        pool = FAPool(base_tp=1, pool_size=workers, threshold=32, tokens_per_worker=32, mode=mode,
                      overlap=overlap, max_batch=4)
        return predict_step(pooled, pool, 4, 70).duration - predict_step(base, pool, 4, 70).duration

    for mode in ("shard", "replicate", "head"):
        assert grown(2, mode, False) == pytest.approx(L * 2e-4 + 3e-3)
    assert grown(1, "shard", False) == 0.0 and grown(2, "shard", True) == 0.0  # not calibrated there
    # Two micro-batches have their own rest, on the whole step.
    pooled = _cpu_cost(RankOverheads(pool_mb2_extra_s=((2, 3e-4, 1e-3),)))
    for mode in ("shard", "head"):
        assert grown(2, mode, True) == pytest.approx(L * 3e-4 + 1e-3) and grown(2, mode, False) == 0.0
    # Below the threshold the pool is idle: nothing added.
    idle = FAPool(base_tp=1, pool_size=2, threshold=32, tokens_per_worker=32, mode="head", overlap=False, max_batch=4)
    assert predict_step(pooled, idle, 4, 16).duration == predict_step(base, idle, 4, 16).duration


def _samples(terms: RankOverheads) -> list[dict]:
    out = []
    kinds = (("afd", 1), ("afd", 2), ("tp", 2), ("pp", 2), ("shard", 1), ("replicate", 2), ("head", 2),
             ("shard-mb2", 2), ("head-mb2", 2))
    for (kind, n), layers in itertools.product(kinds, (2, 12)):
        c = _cpu_cost(terms, cores=2, layers=layers)
        step = predict_step(c, rank_strategy(kind, n, 4), 4, 70).duration
        out.append({"kind": kind, "n": n, "layers": layers, "batch": 4, "context": 70, "step_s": step})
    return out


def test_fit_rank_terms_recovers_known_terms():
    fit = fit_rank_terms(_samples(TERMS), _cpu_cost(cores=2))
    assert fit["exchange_s"] == pytest.approx(TERMS.exchange_s, rel=1e-6)
    assert fit["concurrent_stretch"] == pytest.approx(TERMS.concurrent_stretch, rel=1e-6)
    assert fit["allreduce_extra_s"] == [[2, pytest.approx(3e-4, rel=1e-6)]]
    assert fit["step_extra_s"] == [[2, pytest.approx(6e-4, rel=1e-6)]]
    assert fit["pool_extra_s"] == [[1, pytest.approx(5e-5, rel=1e-6), pytest.approx(1e-3, rel=1e-6)],
                                   [2, pytest.approx(2e-4, rel=1e-6), pytest.approx(3e-3, rel=1e-6)]]
    assert fit["pp_extra_s"] == [[2, pytest.approx(1e-4, rel=1e-6), pytest.approx(2e-3, rel=1e-6)]]
    assert fit["pool_mb2_extra_s"] == [[2, pytest.approx(4e-4, rel=1e-6), pytest.approx(5e-3, rel=1e-6)]]
    with pytest.raises(SimInputError, match="two depths"):
        fit_rank_terms([s for s in _samples(TERMS) if s["layers"] == 2], _cpu_cost(cores=2))


def test_fit_reads_each_rank_engine_against_the_single_process_beside_it():
    """A host that ran each engine 1.0-1.6x slower (the single process timed beside it slowed alike)
    gives the terms of a steady host; without the single process's times it does not."""
    samples = _samples(TERMS)
    for i, s in enumerate(samples):
        c = _cpu_cost(TERMS, cores=2, layers=s["layers"])
        slow = 1.0 + 0.1 * (i % 7)
        s["single_s"] = slow * predict_step(c, StaticTPPP(tp=1, pp=1), 4, 70).duration
        s["step_s"] *= slow
    fit = fit_rank_terms(samples, _cpu_cost(cores=2))
    assert fit["exchange_s"] == pytest.approx(TERMS.exchange_s, rel=1e-6)
    assert fit["concurrent_stretch"] == pytest.approx(TERMS.concurrent_stretch, rel=1e-6)
    assert fit["step_extra_s"] == [[2, pytest.approx(6e-4, rel=1e-6)]]
    drifted = fit_rank_terms([{k: v for k, v in s.items() if k != "single_s"} for s in samples],
                             _cpu_cost(cores=2))
    assert drifted["exchange_s"] != pytest.approx(TERMS.exchange_s, rel=0.05)


def test_calibration_json_carries_rank_terms(tmp_path, cpu_calibration):
    cal = cpu_calibration
    path = tmp_path / "c.json"
    write_calibration({**cal, "ranks": {"exchange_s": 1.2e-4, "concurrent_stretch": 1.3,
                                        "allreduce_extra_s": [[2, 3e-4]], "step_extra_s": [[2, 6e-4]],
                                        "pool_extra_s": [[1, 5e-5, 1e-3], [2, 2e-4, 3e-3]],
                                        "pp_extra_s": [[2, 1e-4, 2e-3]], "pool_mb2_extra_s": [[2, 4e-4, 5e-3]]}},
                     path)
    assert apply_calibration(get_hardware("cpu"), load_calibration(path)).ranks == TERMS
    write_calibration(cal, path)  # made before the rank terms: none
    assert apply_calibration(get_hardware("cpu"), load_calibration(path)).ranks is None
