"""Simulator vs the real engine (issue 6): the cost model's predicted decode step time against
the engine's measured TPOT on the same GPU.

Inputs, both measured on an H100 in this repository:
  - benchmarks/results/tpot-*.json: `fapool bench tpot` (seed000 preset, bf16, batch x context);
  - benchmarks/results/sim_calibration_h100.json: `fapool calibrate` on the same kind of GPU.
The simulator models device time, so rows compare it with the GPU time of a step (CUDA graph
replay) and, separately, with the whole engine step (host work included).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from fapool.bench.results import write_result
from fapool.sim.calibrate import apply_calibration, load_calibration
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import get_hardware
from fapool.sim.validate import error_summary, tpot_error_table

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tpot", default=None, help="a tpot-*.json (default: the newest)")
    p.add_argument("--calibration", default=os.path.join(HERE, "results", "sim_calibration_h100.json"))
    ns = p.parse_args()
    path = ns.tpot or sorted(glob.glob(os.path.join(HERE, "results", "tpot-*.json")))[-1]
    with open(path) as f:
        measured = json.load(f)
    rows = measured["seed000"]["rows"]
    cost = CostModel(load_model_config("seed000"), apply_calibration(get_hardware("h100"), load_calibration(ns.calibration)))
    gpu = tpot_error_table([(r["batch"], r["context"], r["graph_replay_ms"] / 1e3) for r in rows], cost)
    step = tpot_error_table([(r["batch"], r["context"], r["tpot_ms"] / 1e3) for r in rows], cost)
    print(f"{'batch':>5} {'ctx':>6} {'measured GPU ms':>16} {'measured step ms':>17} {'predicted ms':>13} {'err vs GPU':>11} {'err vs step':>12}")
    for g, s in zip(gpu, step):
        print(f"{g['batch']:5d} {g['context']:6d} {g['measured_s'] * 1e3:16.3f} {s['measured_s'] * 1e3:17.3f} "
              f"{g['predicted_s'] * 1e3:13.3f} {g['rel_error']:+11.1%} {s['rel_error']:+12.1%}")
    sg, ss = error_summary(gpu), error_summary(step)
    print("vs GPU time:", sg)
    print("vs engine step:", ss)
    result = {
        "env": measured["env"],
        "inputs": {"tpot": os.path.relpath(path, HERE), "calibration": os.path.relpath(ns.calibration, HERE)},
        "vs_gpu_time": {"rows": gpu, "summary": sg},
        "vs_engine_step": {"rows": step, "summary": ss},
    }
    summary = (f"simulated vs measured seed000 TPOT on H100: GPU time within 10% on {sg['within_10pct']}/{sg['rows']} "
               f"(max {sg['max_abs_rel_error']:.0%}); whole engine step {ss['within_10pct']}/{ss['rows']} "
               f"(max {ss['max_abs_rel_error']:.0%})")
    print(write_result("sim_vs_engine", result, summary))


if __name__ == "__main__":
    main()
