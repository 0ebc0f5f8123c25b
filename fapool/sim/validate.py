"""Simulator vs the real engine: predicted decode steps and their error tables (benchmarks/sim_vs_engine*)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fapool.sim.cost_model import CostModel
from fapool.sim.ledger import PoolLedger
from fapool.sim.strategies import FAPool, StaticTPPP, StepBatch, StepCost, Strategy


def predict_step(cost: CostModel, strategy: Strategy, batch: int, context: int) -> StepCost:
    """One decode step of `batch` sequences of `context` cached tokens under any strategy (pool KV placed
    as the engine places it, AFD's requests spread evenly)."""
    if isinstance(strategy, FAPool):
        return strategy.step_cost(cost, *pool_step_inputs(cost, strategy, batch, context))
    group = np.arange(batch) * strategy.num_groups() // batch
    step = StepBatch(np.full(batch, context, np.int64), np.ones(batch, np.int64), group)
    return strategy.step_cost(cost, step, None)


def pool_step_inputs(cost: CostModel, pool: FAPool, batch: int, context: int) -> tuple[StepBatch, PoolLedger]:
    """The decode StepBatch and the ledger with the prompts' KV placed, for pricing a step."""
    ctx = np.full(batch, context, np.int64)
    ledger = pool.make_ledger(cost, batch, np.zeros(batch, np.int64), max_slot_tokens=context + 1)
    assert isinstance(ledger, PoolLedger)
    # Prompts arrive one by one (the engine prefills in order), each placed whole.
    for s in range(batch):
        new = np.zeros(batch, np.int64)
        new[s] = context
        if (over := ledger.try_allocate(np.where(np.arange(batch) < s, ctx, 0), new)) is not None:
            raise ValueError(f"{batch} x {context} tokens do not fit {pool.describe()} ({over})")
    one = np.ones(batch, np.int64)
    step = StepBatch(ctx=ctx, new=one, group=np.zeros(batch, np.int64))
    if ledger.try_allocate(ctx, one) is not None:
        raise ValueError("the decode step's new tokens do not fit")
    return step, ledger


def tpot_error_table(rows: Iterable[tuple[int, int, float]], cost: CostModel) -> list[dict]:
    """Per measured single-process row: batch, context, measured_s, predicted_s, rel_error (predicted /
    measured - 1)."""
    out = []
    for batch, context, measured in rows:
        if batch < 1 or context < 0 or measured <= 0:
            raise ValueError(f"bad measurement row {(batch, context, measured)!r}")
        pred = predict_step(cost, StaticTPPP(tp=1, pp=1), batch, context).duration
        out.append({"batch": batch, "context": context, "measured_s": measured, "predicted_s": pred,
                    "rel_error": (pred - measured) / measured})
    return out


def error_summary(table: list[dict]) -> dict:
    errs = [abs(r["rel_error"]) for r in table]
    return {"rows": len(errs), "max_abs_rel_error": max(errs, default=0.0),
            "mean_abs_rel_error": sum(errs) / len(errs) if errs else 0.0,
            "within_10pct": sum(e <= 0.10 for e in errs)}
