"""Simulator vs the real engine (issue 6) on one GPU: the cost model's predicted decode step
against `fapool bench tpot`'s measured rows (seed000 preset, bf16, batch x context), both as
the GPU time of a step (CUDA graph replay) and as the whole engine step (host included).

    python benchmarks/sim_vs_engine.py --tpot tpot-X.json --calibration calib.json [--out-dir D]

The device prediction uses the calibration's kernel fits and, when it has an engine section
(`fapool calibrate` without --no-engine), its fixed per-layer / per-step device costs. The
whole-step prediction adds a host model:
  --host calibration  the calibration's host terms (fitted on a tiny engine model, so every
                      bench row is a validation row);
  --host split        (default when the calibration has no host model, e.g. the kernels-only
                      H100 file) host terms fitted to the bench's own measured host time
                      (tpot_ms - graph_replay_ms = engine_host_ms + runner_host_ms) on half the
                      rows (a batch x context checkerboard) and validated on the other half.
With --fixed-from-profile (for calibrations without an engine section) the small kernels' time
is read from the bench's kernel_profile rows (norms, adds, rotary, KV write, activation, the
split-KV reduce, copies): those rows then leave the GPU-time validation. Both choices are
printed and recorded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fapool

from fapool.bench.results import environment, repo_root, write_result
from fapool.sim.calibrate import apply_calibration, fit_host, load_calibration
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import HostProfile, get_hardware
from fapool.sim.validate import checkerboard_split, error_summary, tpot_error_table

HERE = os.path.dirname(os.path.abspath(__file__))
BIG_KERNELS = re.compile(r"nvjet|gemm|cutlass|splitKreduce|xmma|_decode_split_kernel", re.IGNORECASE)


def small_kernel_terms(profiled: list[dict], layers: int) -> dict:
    """Fixed device seconds a layer / a step spends in small kernels, from kernel profiles:
    a kernel called c times a step counts c // layers times a layer and the rest a step."""
    per_layer, per_step = [], []
    for row in profiled:
        lay = stp = 0.0
        for k in row["kernel_profile"]:
            calls = round(k["calls_per_step"])
            if BIG_KERNELS.search(k["kernel"]) or calls <= 0:
                continue
            each = k["us_per_step"] * 1e-6 / calls
            lay += (calls // layers) * each
            stp += (calls % layers) * each
        per_layer.append(lay)
        per_step.append(stp)
    return {
        "layer_fixed_s": sum(per_layer) / len(per_layer),
        "step_fixed_s": sum(per_step) / len(per_step),
        "rows": [(r["batch"], r["context"]) for r in profiled],
    }


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
    p.add_argument("--calibration", default=os.path.join(HERE, "results", "sim_calibration_h100.json"))
    p.add_argument("--hardware", default=None, help="preset under the calibration (default: from its device name)")
    p.add_argument("--host", choices=("auto", "calibration", "split"), default="auto")
    p.add_argument("--fixed-from-profile", action="store_true", help="small-kernel costs from the bench's profile")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    ns = p.parse_args(argv)
    path = ns.tpot or sorted(glob.glob(os.path.join(HERE, "results", "tpot-*.json")))[-1]
    with open(path) as f:
        measured = json.load(f)
    rows = [r for r in measured["seed000"]["rows"] if r.get("graph_replay_ms")]
    cal = load_calibration(ns.calibration)
    hw_name = ns.hardware or ("h200" if "H200" in cal.get("device_name", "") else "h100")
    hw = apply_calibration(get_hardware(hw_name), cal)
    model = load_model_config("seed000")
    notes = [f"calibration {os.path.basename(ns.calibration)} (schema {cal['schema']}) on preset {hw_name}"]

    gpu_rows = rows
    if ns.fixed_from_profile:
        profiled = [r for r in rows if r.get("kernel_profile")]
        if not profiled:
            p.error("--fixed-from-profile: the tpot JSON has no kernel_profile rows")
        terms = small_kernel_terms(profiled, model.num_hidden_layers)
        hw = hw.replace(layer_fixed_s=terms["layer_fixed_s"], step_fixed_s=terms["step_fixed_s"])
        gpu_rows = [r for r in rows if not r.get("kernel_profile")]
        notes.append(
            f"small-kernel fixed costs from the kernel profile of rows {terms['rows']} "
            f"({terms['layer_fixed_s'] * 1e6:.1f} us a layer, {terms['step_fixed_s'] * 1e6:.1f} us a step); "
            "those rows are left out of the GPU-time validation"
        )
    cost = CostModel(model, hw)
    gpu = _table(gpu_rows, cost.device_only(), "graph_replay_ms")

    host_mode = ns.host
    if host_mode == "auto":
        host_mode = "calibration" if hw.host is not None else "split"
    if host_mode == "calibration":
        if hw.host is None:
            p.error("--host calibration: this calibration has no host model (run `fapool calibrate` without --no-engine)")
        val_idx = list(range(len(rows)))
        host_fit = {"source": "calibration (tiny engine model)", "fit_rows": []}
        notes.append("host terms from the calibration's tiny-engine decode: every bench row validates")
    else:
        fit_idx, val_idx = checkerboard_split([(r["batch"], r["context"]) for r in rows])
        fr = [rows[i] for i in fit_idx]
        h = fit_host(
            [r["batch"] for r in fr], [r["kv_tokens_read"] for r in fr], [serial_host_s(r) for r in fr]
        )
        host = HostProfile(
            step_s=h["step_s"], per_seq_s=h["per_seq_s"], per_kv_token_s=h["per_kv_token_s"], cuda_graphs=True,
            async_scheduling=any(r.get("async_scheduling") for r in rows),
        )
        cost = CostModel(model, hw.replace(host=host))
        host_fit = {"source": "split", **h, "fit_rows": [(r["batch"], r["context"]) for r in fr]}
        notes.append(
            "SPLIT: host terms fitted to the bench's measured host time (synchronous step - graph_replay_ms) on the "
            f"checkerboard half {host_fit['fit_rows']}; the whole-step errors below are on the other half only"
        )
    vrows = [rows[i] for i in val_idx]
    if ns.fixed_from_profile:  # the profiled rows fed the device model: not validation rows
        vrows = [r for r in vrows if not r.get("kernel_profile")]
    step = _table(vrows, cost, "tpot_ms")
    for row, r in zip(step, vrows):
        row["measured_host_s"] = serial_host_s(r)
        row["predicted_host_s"] = float(cost.host_serial(r["batch"], r["kv_tokens_read"]))

    for line in notes:
        print("note:", line)
    print(f"{'batch':>5} {'ctx':>6} {'GPU meas':>9} {'GPU pred':>9} {'err':>7}   {'step meas':>9} {'step pred':>9} {'err':>7}  (ms)")
    by_key = {(s["batch"], s["context"]): s for s in step}
    for g in gpu:
        s = by_key.get((g["batch"], g["context"]))
        tail = (f"{s['measured_s'] * 1e3:9.3f} {s['predicted_s'] * 1e3:9.3f} {s['rel_error']:+7.1%}" if s else f"{'(fit row)':>27}")
        print(f"{g['batch']:5d} {g['context']:6d} {g['measured_s'] * 1e3:9.3f} {g['predicted_s'] * 1e3:9.3f} "
              f"{g['rel_error']:+7.1%}   {tail}")
    sg, ss = error_summary(gpu), error_summary(step)
    print("vs GPU time:", sg)
    print("vs whole engine step:", ss)
    result = {
        "env": measured["env"],
        "analysis_env": environment("cpu"),  # where and at which commit this comparison ran
        "inputs": {"tpot": _shown(path), "calibration": _shown(ns.calibration)},
        "hardware_preset": hw_name,
        "notes": notes,
        "host_fit": host_fit,
        "device_fixed": {"layer_fixed_s": hw.layer_fixed_s, "step_fixed_s": cost.step_overhead()},
        "vs_gpu_time": {"rows": gpu, "summary": sg},
        "vs_engine_step": {"rows": step, "summary": ss, "host_mode": host_mode},
    }
    dev = measured["env"].get("device", "?")
    summary = (
        f"simulated vs measured seed000 TPOT on {dev}: GPU time within 10% on {sg['within_10pct']}/{sg['rows']} "
        f"(max {sg['max_abs_rel_error']:.0%}); whole engine step {ss['within_10pct']}/{ss['rows']} "
        f"(max {ss['max_abs_rel_error']:.0%}; host {'from the calibration' if host_mode == 'calibration' else 'fitted on the other half of the rows'})"
        + ("; small kernels from the bench's profile rows" if ns.fixed_from_profile else "")
    )
    print(summary)
    print("wrote", write_result("sim_vs_engine", result, summary, out_dir=ns.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
