import pytest

from fapool.sim.strategies import StaticTPPP
from fapool.sim.validate import error_summary, predict_step, tpot_error_table


def predict_tpot(cost, batch, context):
    return predict_step(cost, StaticTPPP(tp=1, pp=1), batch, context).duration


def test_error_table(h100_cost):
    rows = [(b, c, predict_tpot(h100_cost, b, c)) for b in (1, 16, 64) for c in (128, 2048)]
    table = tpot_error_table(rows, h100_cost)
    assert all(r["rel_error"] == pytest.approx(0.0, abs=1e-12) for r in table)
    off = tpot_error_table([(16, 2048, 1.25 * predict_tpot(h100_cost, 16, 2048))], h100_cost)
    assert off[0]["rel_error"] == pytest.approx(-0.2)
    s = error_summary(table + off)
    assert s["rows"] == 7 and s["within_10pct"] == 6 and s["max_abs_rel_error"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        tpot_error_table([(0, 10, 1.0)], h100_cost)


def test_tpot_grows_with_batch_and_context(h100_cost):
    assert (
        predict_tpot(h100_cost, 64, 8192)
        > predict_tpot(h100_cost, 64, 1024)
        > predict_tpot(h100_cost, 1, 1024)
    )
