"""The pool part of `fapool calibrate --pool` (CPU): a short decode of the real engine with an
attention pool on the tiny twin, at two depths, with (workers, micro-batches) (1, 1), (1, 2) and
(2, 1) (at most two busy processes), at contexts below and above the pool threshold. From the
driver's StepReports (20th percentiles) two non-negative least-squares fits give PoolOverheads:
each worker's attention time beyond the cost model's, and the driver's busy time beyond its
modelled dense work, local attention, merge and LM head (docs/simulator.md).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np

from fapool.config import ModelConfig
from fapool.sim.engine_calibrate import build_engine, fit_nonneg, start_decode, tiny_twin
from fapool.sim.errors import SimInputError

# pools: (attention workers, micro-batches); contexts below and above the threshold
QUICK_POOL = {"layers": (4, 12), "pools": ((1, 1), (1, 2), (2, 1)), "batches": (2, 4), "contexts": (16, 80),
              "threshold": 32, "tokens_per_worker": 32, "steps": 8, "warmup": 2}
WORKER_TERMS = ("worker_call_s", "worker_per_seq_s")
DRIVER_TERMS = ("driver_mb_s", "driver_pool_mb_s", "driver_route_s", "driver_step_s")


def measure_pool_decode(engine, batch: int, context: int, steps: int, warmup: int) -> dict:
    """20th percentiles of `steps` decode steps' StepReports on a pool engine: the driver's busy time
    (dense + local attention), its wait and each worker's attention time, and the mean context."""
    ids, reqs = start_decode(engine, batch, context, steps + warmup + 8, warmup)
    try:
        ctx0 = reqs[0].num_computed_tokens
        stats = engine.executor.reports
        stats.clear()
        for _ in range(steps):
            engine.step()
        rows = list(stats)
    finally:
        for rid in ids:
            engine.abort_request(rid)
    p20 = lambda xs: float(np.percentile(xs, 20))  # noqa: E731
    workers = sorted({w for s in rows for w in s.workers})
    return {"batch": batch, "context": context, "context_mean": ctx0 + (steps - 1) / 2,
            "driver_busy_s": p20([s.dense_s + s.local_attention_s for s in rows]),
            "driver_wait_s": p20([s.wait_s for s in rows]), "total_s": p20([s.total_s for s in rows]),
            "worker_attention_s": {
                str(w): p20([s.workers[w].compute_s if w in s.workers else 0.0 for s in rows]) for w in workers}}


def _modelled(cost, sample: dict):
    """(driver busy, per-worker busy, calls, seqs, routes, pool micro-batches, micro-batches) of a
    sample priced with zero pool terms and no contention: what the pool terms come on top of."""
    from fapool.sim.strategies import FAPool
    from fapool.sim.validate import pool_step_inputs

    pool = FAPool(base_tp=1, pool_size=sample["workers"], threshold=sample["threshold"], mode="shard",
                  tokens_per_worker=sample["tokens_per_worker"], overlap=sample["micro_batches"] > 1,
                  max_batch=sample["batch"])
    step, ledger = pool_step_inputs(cost, pool, sample["batch"], int(round(sample["context_mean"])))
    sc = pool.step_cost(cost, step, ledger)
    calls, seqs, routes, pool_mbs, n_mb = pool.pool_calls(step, ledger)
    if not np.any(sc.busy[1:] > 0):
        routes, pool_mbs, n_mb = 0, 0, 1
    return float(sc.busy[0]), sc.busy[1:], calls, seqs, routes, pool_mbs, n_mb


def fit_pool_terms(samples: list[dict], cost) -> dict:
    """Fit PoolOverheads' terms to pool samples; `cost` prices the samples' model with zero pool
    terms and no cpu_cores (its depth replaced by each sample's `layers`)."""
    if len(samples) < 3:
        raise SimInputError(f"the pool fit needs at least 3 samples, got {len(samples)}")
    from fapool.sim.cost_model import CostModel

    wx, wy, dx, dy = [], [], [], []
    for s in samples:
        c = CostModel(cost.model.replace(num_hidden_layers=s["layers"]), cost.hw, cost.include_host)
        driver, workers, calls, seqs, routes, pool_mbs, n_mb = _modelled(c, s)
        L = s["layers"]
        dx.append([L * n_mb, L * pool_mbs, L * routes, 1.0])
        # The step's fixed device work is in the driver's busy time and priced by finish_step.
        dy.append(s["driver_busy_s"] - driver - c.step_overhead())
        for w in range(s["workers"]):
            if calls[w] > 0:
                wx.append([L * calls[w], L * seqs[w]])
                wy.append(s["worker_attention_s"][str(w + 1)] - float(workers[w]))
    out: dict = {}
    if len(wy) >= 2:
        cw = fit_nonneg(np.array(wx), np.array(wy))
        out.update({name: float(v) for name, v in zip(WORKER_TERMS, cw)})
        out["worker_residuals_s"] = [float(v) for v in np.array(wy) - np.array(wx) @ cw]
    else:
        out.update({name: 0.0 for name in WORKER_TERMS})
    cd = fit_nonneg(np.array(dx), np.array(dy))
    out.update({name: float(v) for name, v in zip(DRIVER_TERMS, cd)})
    out["driver_residuals_s"] = [float(v) for v in np.array(dy) - np.array(dx) @ cd]
    return out


def calibrate_pool(cost_for: Callable[[ModelConfig], object], model: ModelConfig | None = None,
                   grid: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the tiny pool engines on the CPU and fit the pool terms; `cost_for(config)` is the
    CostModel (calibrated, zero pool terms) that prices the modelled parts."""
    import gc

    grid = grid or QUICK_POOL
    t0 = time.perf_counter()
    max_b, max_ctx = max(grid["batches"]), max(grid["contexts"])
    blocks = max_b * (-(-(max_ctx + grid["steps"] + grid["warmup"] + 16) // 16) + 1) + 8
    samples: list[dict] = []
    for depth, (workers, n_mb) in itertools.product(grid["layers"], grid["pools"]):
        engine = build_engine(
            tiny_twin(model, depth), "cpu", max_b, 8192, blocks,
            attention_workers=workers, micro_batches=n_mb, pool_threshold=grid["threshold"],
            tokens_per_pool_worker=grid["tokens_per_worker"], pool_mode="shard", worker_kv_blocks=blocks,
        )
        try:
            measure_pool_decode(engine, 2, max_ctx, 2, 1)  # first steps: allocation, warm caches
            for batch, context in itertools.product(grid["batches"], grid["contexts"]):
                row = measure_pool_decode(engine, batch, context, grid["steps"], grid["warmup"])
                row.update(layers=depth, micro_batches=n_mb, workers=workers, threshold=grid["threshold"],
                           tokens_per_worker=grid["tokens_per_worker"])
                samples.append(row)
                if progress:
                    progress(f"pool L={depth} A={workers} mb={n_mb} B={batch} ctx={context}: driver busy "
                             f"{row['driver_busy_s'] * 1e3:.2f} ms, "
                             f"worker {list(row['worker_attention_s'].values())}")
        finally:
            engine.shutdown()
            gc.collect()
    cost = cost_for(tiny_twin(model, grid["layers"][0]))
    fit = fit_pool_terms(samples, cost)
    return {"model": f"tiny twin, layers {grid['layers']}, (workers, micro-batches) {grid['pools']}", **fit,
            "samples": samples, "seconds": round(time.perf_counter() - t0, 3)}
