"""Simulator vs the real engine (issue 6) on one GPU: the cost model's predicted decode step
against `fapool bench tpot`'s measured rows (seed000 preset, bf16, batch x context), both as
the GPU time of a step (CUDA graph replay) and as the whole engine step (host included).

    python benchmarks/sim_vs_engine.py --tpot tpot-X.json --calibration calib.json [--out-dir D]

The device prediction uses the calibration's kernel fits and its engine section's fixed per-layer /
per-step device costs; the whole-step prediction adds the calibration's host model (fitted on the
engine decodes of the calibration's own run, so every bench row is a validation row).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fapool

from fapool.bench.results import environment, repo_root, write_result
from fapool.sim.calibrate import apply_calibration, load_calibration
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import get_hardware
from fapool.sim.validate import error_summary, tpot_error_table

HERE = os.path.dirname(os.path.abspath(__file__))


def _shown(path: str) -> str:
    """A path relative to the repository when inside it (results stay portable)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, repo_root()) if full.startswith(repo_root() + os.sep) else full


def serial_host_s(row: dict) -> float:
    """The host's serial work in a step: the synchronous step's time beyond its graph replay
    (with async scheduling tpot_ms overlaps the two, so the bench times the batch both ways)."""
    return (row.get("tpot_sync_ms") or row["tpot_ms"]) / 1e3 - row["graph_replay_ms"] / 1e3


def _table(rows: list[dict], cost: CostModel, key: str, scale: float = 1e-3) -> list[dict]:
    """Error table at each row's mean context over its timed steps (kv_tokens_read / batch),
    reported under its nominal context."""
    eff = [round(r["kv_tokens_read"] / r["batch"]) - 1 for r in rows]
    table = tpot_error_table([(r["batch"], c, r[key] * scale) for r, c in zip(rows, eff)], cost)
    for t, r, c in zip(table, rows, eff):
        t["context"], t["context_eff"] = r["context"], c
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tpot", default=None, help="a tpot-*.json (default: the newest in benchmarks/results)")
    p.add_argument("--calibration", required=True, help="a GPU calibration with an engine section")
    p.add_argument("--hardware", default=None, help="preset under the calibration (default: from its device name)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    ns = p.parse_args(argv)
    path = ns.tpot or sorted(glob.glob(os.path.join(HERE, "results", "tpot-*.json")))[-1]
    with open(path) as f:
        measured = json.load(f)
    rows = [r for r in measured["seed000"]["rows"] if r.get("graph_replay_ms")]
    cal = load_calibration(ns.calibration)
    hw_name = ns.hardware or ("h200" if "H200" in cal.get("device_name", "") else "h100")
    hw = apply_calibration(get_hardware(hw_name), cal)
    if hw.host is None:
        p.error(f"{ns.calibration} has no host model (run `fapool calibrate` without --no-engine)")
    model = load_model_config("seed000")
    notes = [f"calibration {os.path.basename(ns.calibration)} (schema {cal['schema']}) on preset {hw_name}",
             "host terms from the calibration's engine decode: every bench row validates"]
    cost = CostModel(model, hw)
    gpu = _table(rows, cost.device_only(), "graph_replay_ms")
    step = _table(rows, cost, "tpot_ms")
    for row, r in zip(step, rows):
        row["measured_host_s"] = serial_host_s(r)
        row["predicted_host_s"] = float(cost.hw.host.serial(r["batch"], r["kv_tokens_read"]))

    for line in notes:
        print("note:", line)
    print(f"{'batch':>5} {'ctx':>6} {'GPU meas':>9} {'GPU pred':>9} {'err':>7}   {'step meas':>9} {'step pred':>9} {'err':>7}  (ms)")
    by_key = {(s["batch"], s["context"]): s for s in step}
    for g in gpu:
        s = by_key[(g["batch"], g["context"])]
        print(f"{g['batch']:5d} {g['context']:6d} {g['measured_s'] * 1e3:9.3f} {g['predicted_s'] * 1e3:9.3f} "
              f"{g['rel_error']:+7.1%}   {s['measured_s'] * 1e3:9.3f} {s['predicted_s'] * 1e3:9.3f} "
              f"{s['rel_error']:+7.1%}")
    sg, ss = error_summary(gpu), error_summary(step)
    print("vs GPU time:", sg)
    print("vs whole engine step:", ss)
    result = {
        "env": measured["env"],
        "analysis_env": environment("cpu"),  # where and at which commit this comparison ran
        "inputs": {"tpot": _shown(path), "calibration": _shown(ns.calibration)},
        "hardware_preset": hw_name,
        "notes": notes,
        "device_fixed": {"layer_fixed_s": hw.layer_fixed_s, "step_fixed_s": cost.step_overhead()},
        "vs_gpu_time": {"rows": gpu, "summary": sg},
        "vs_engine_step": {"rows": step, "summary": ss},
    }
    dev = measured["env"].get("device", "?")
    summary = (
        f"simulated vs measured seed000 TPOT on {dev}: GPU time within 10% on {sg['within_10pct']}/{sg['rows']} "
        f"(max {sg['max_abs_rel_error']:.0%}); whole engine step {ss['within_10pct']}/{ss['rows']} "
        f"(max {ss['max_abs_rel_error']:.0%}; host from the calibration)"
    )
    print(summary)
    print("wrote", write_result("sim_vs_engine", result, summary, out_dir=ns.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
