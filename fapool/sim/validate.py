"""Simulator vs the real engine: the error table of predicted vs measured TPOT.

NOT YET CONNECTED: the engine is being written concurrently. When `fapool bench` can report
(batch, context, TPOT) rows for single-device decode runs, feed them to `tpot_error_table`
with a cost model built from a calibration taken on the same device:

    cal = load_calibration("calib.json")
    cost = CostModel(model, apply_calibration(get_hardware("cpu"), cal))
    table = tpot_error_table(rows, cost)          # rows: [(batch, context, measured_tpot_s), ...]

The acceptance target (issue 6) is |error| <= 10% on every row.
"""

from __future__ import annotations

from collections.abc import Iterable

from fapool.sim.cost_model import CostModel
from fapool.sim.strategies import StaticTPPP


def predict_tpot(cost: CostModel, batch: int, context: int, tp: int = 1, pp: int = 1) -> float:
    """Steady-state decode step time of `batch` sequences each with `context` cached tokens."""
    kv = batch * (context + 1)
    return StaticTPPP(tp=tp, pp=pp).timing(cost, batch, batch, kv, kv)[0]


def tpot_error_table(
    rows: Iterable[tuple[int, int, float]], cost: CostModel, tp: int = 1, pp: int = 1
) -> list[dict]:
    """One dict per measured row: batch, context, measured_s, predicted_s, rel_error
    ((predicted - measured) / measured)."""
    out = []
    for batch, context, measured in rows:
        if batch < 1 or context < 0 or measured <= 0:
            raise ValueError(f"bad measurement row {(batch, context, measured)!r}")
        pred = predict_tpot(cost, batch, context, tp, pp)
        out.append(
            {
                "batch": batch,
                "context": context,
                "measured_s": measured,
                "predicted_s": pred,
                "rel_error": (pred - measured) / measured,
            }
        )
    return out


def error_summary(table: list[dict]) -> dict:
    errs = [abs(r["rel_error"]) for r in table]
    return {
        "rows": len(errs),
        "max_abs_rel_error": max(errs, default=0.0),
        "mean_abs_rel_error": sum(errs) / len(errs) if errs else 0.0,
        "within_10pct": sum(e <= 0.10 for e in errs),
    }
