"""Simulator vs the real engine on the CPU: every topology the engine runs on processes
(single, TP, PP, the attention pool in each mode, Lamina, AFD), predicted vs measured decode
step time.

One run does everything here:
  1. `fapool calibrate --pool` on this CPU (torch threads 1, as the ranks use): kernel
     rooflines, send/recv and all-reduce over the engine's same-host transport, the engine
     decode that fits the fixed per-layer / per-step costs and the host model, and the
     tiny-engine pool run that fits the pool machinery's costs; the cores are recorded for the contention model. Written beside
     the result JSON (or `--calibration FILE`: one made in an earlier, separate run).
  2. The engine on the embedded SmolLM2-135M (float32) for each topology (`--topologies`):
     `batch` prompts of `input_len` random tokens; after the prefill and a warm-up, each
     decode step of the whole batch is timed. The single process stays up and is measured in
     turn with each other engine (`--repeats` rounds), so drifting load from other processes
     falls on both alike.
  3. The simulator's step for each, from the same strategy classes `fapool simulate` and
     `fapool plan` use (StaticTPPP, FAPool in the engine's pool modes, AFD), priced at the same
     batch and mean context by `validate.predict_step`: whole step (host model) and device only.

    PYTHONPATH=. python benchmarks/sim_vs_engine_cpu.py [--topologies single tp3 pool-shard-x2 ...]

Nothing here is fitted to the engine rows. With --twin model (default) the engine part of the
calibration decodes SmolLM2's own layer shapes cut to 1, 4 and 8 layers (random weights).
The measured step is reported as median and 20th percentile (the machine may be shared:
other processes only ever add time); errors are against the median. Each engine process has
one thread; a topology of n ranks runs n processes on the machine's cores. The sparse row
(`sparse`) runs the single process with a uniform sparse profile (every KV head reads
`--sparse-share` of its blocks, from the first step) at `--sparse-input-len`: its step and
the dense single process's beside it at that length.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fapool


def sparse_profile(model_config, share: float, path: str) -> str:
    """A profile JSON in which every KV head of every layer reads `share` of its blocks."""
    from fapool.sparse.profile import SparseProfile

    m = model_config
    SparseProfile(model="uniform (sim_vs_engine_cpu)", block_size=16, target_recall=0.0, min_blocks=4,
                  num_layers=m.num_hidden_layers, num_heads=m.num_attention_heads,
                  num_kv_heads=m.num_key_value_heads,
                  kv_budget=[[share] * m.num_key_value_heads] * m.num_hidden_layers).save(path)
    return path


def topologies(ns, model_config=None) -> dict[str, tuple[str, dict, object]]:
    """key -> (label, EngineArgs for the engine, the simulator's strategy)."""
    from fapool.sim.strategies import AFD, FAPool, StaticTPPP

    B = ns.batch
    out: dict[str, tuple[str, dict, object]] = {
        "single": ("single process", {}, StaticTPPP(tp=1, pp=1, max_batch=B)),
        "tp3": ("TP 3 (3 ranks on the cores)", {"tensor_parallel_size": 3}, StaticTPPP(tp=3, pp=1, max_batch=B)),
        "pp2": ("PP 2", {"pipeline_parallel_size": 2}, StaticTPPP(tp=1, pp=2, max_batch=B)),
    }
    if model_config is not None:
        path = sparse_profile(model_config, ns.sparse_share, os.path.join(ns.tmp_dir, "uniform_sparse_profile.json"))
        out["sparse"] = (f"sparse, {ns.sparse_share:g} of the blocks, ctx {ns.sparse_input_len}",
                         {"sparse_attention": path, "sparse_min_context": 0},
                         StaticTPPP(tp=1, pp=1, max_batch=B, kv_share=ns.sparse_share))

    def pool(mode: str, workers: int, mb: int, threshold: int) -> tuple[dict, FAPool]:
        args = {"attention_workers": workers, "micro_batches": mb, "pool_threshold": threshold,
                "tokens_per_pool_worker": ns.tokens_per_pool_worker, "pool_mode": mode}
        return args, FAPool(base_tp=1, pool_size=workers, threshold=threshold,
                            tokens_per_worker=ns.tokens_per_pool_worker, mode=mode, overlap=mb > 1, max_batch=B)

    for mode, workers, mb in (("shard", 1, 1), ("shard", 1, 2), ("shard", 2, 1), ("shard", 2, 2),
                              ("replicate", 2, 1), ("head", 2, 1)):
        key = f"pool-{mode}-x{workers}" + ("-mb2" if mb > 1 else "")
        out[key] = (f"pool {mode} x{workers}, {mb} micro-batch{'es' if mb > 1 else ''}",
                    *pool(mode, workers, mb, ns.pool_threshold))
    for mode in ("shard", "head"):
        out[f"lamina-{mode}-x2"] = (f"Lamina (threshold 0) {mode} x2, 2 micro-batches", *pool(mode, 2, 2, 0))
    out["lamina-shard-x1"] = ("Lamina (threshold 0) x1, 2 micro-batches", *pool("shard", 1, 2, 0))
    for mb in (1, 2):
        out["afd-1-1" + ("-mb2" if mb > 1 else "")] = (
            f"AFD 1:1, {mb} micro-batch{'es' if mb > 1 else ''}",
            {"afd_attention_ranks": 1, "afd_ffn_ranks": 1, "micro_batches": mb},
            AFD(r=1, f_tp=1, max_batch_per_attn=B, overlap=mb > 1),
        )
    return out


DEFAULT_TOPOLOGIES = ("single", "tp3", "pp2", "pool-shard-x1", "pool-shard-x2-mb2", "pool-replicate-x2",
                      "pool-head-x2", "lamina-head-x2", "afd-1-1", "afd-1-1-mb2", "sparse")


def measure(llm, batch: int, input_len: int, steps: int, warmup: int) -> dict:
    """Time `steps` decode steps of the whole batch after prefill + `warmup` steps."""
    import torch

    from fapool.sampling_params import SamplingParams

    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, engine.config.model.vocab_size, (batch, input_len), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=steps + warmup + 4, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.groups[i][0] for i in ids]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    for _ in range(warmup):
        engine.step()
    ctx0 = reqs[0].num_computed_tokens
    stats = engine.executor.reports
    if stats is not None:
        stats.clear()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    tokens = [list(r.output_token_ids) for r in reqs]
    breakdown = None
    if stats:  # the pool driver's own record, per step
        n = len(stats)
        breakdown = {
            "driver_dense_s": sum(x.dense_s for x in stats) / n,
            "driver_local_attention_s": sum(x.local_attention_s for x in stats) / n,
            "driver_wait_s": sum(x.wait_s for x in stats) / n,
            "worker_attention_s": {
                w: sum(x.workers[w].compute_s for x in stats if w in x.workers) / n
                for w in sorted({w for x in stats for w in x.workers})
            },
        }
    for rid in ids:
        engine.abort_request(rid)
    return {
        "step_median_s": statistics.median(times),
        "step_p20_s": float(np.percentile(times, 20)),
        "steps_s": times,
        "context_mean": ctx0 + (steps - 1) / 2,
        "tokens": tokens,
        "breakdown": breakdown,
    }


def gemm_probe(model_config, m: int = 4):
    """A drift probe of the machine: seconds of the model's gate/up GEMM at m rows (operands
    rotated past the caches, 20th percentile), as the calibration timed the same shape. The
    ratio probe / calibration says how much slower the machine ran while the engine was
    measured than while it was calibrated (memory bandwidth shared with other tenants)."""
    import torch

    from fapool.bench.calibrate import _copies, _cycle, model_linear_shapes, time_op
    from fapool.layers.cpu_linear import linear_fn

    n, k = model_linear_shapes(model_config)[2]
    ws = [linear_fn(torch.randn(n, k)) for _ in range(_copies(n * k * 4))]
    a = torch.randn(m, k)
    return {"m": m, "n": n, "k": k, "s": time_op(_cycle(lambda w: w(a), ws), torch.device("cpu"))}


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the machine has been busy since boot, CPU-seconds of this process and its reaped
    children): their growth over the measurement, less ours, is what other processes took."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (sum(ticks[:3]) + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _merge(runs: list[dict]) -> dict:
    """One configuration's rounds as one measurement (all timed steps pooled)."""
    times = [t for r in runs for t in r["steps_s"]]
    breakdowns = [r["breakdown"] for r in runs if r["breakdown"]]
    merged = None
    if breakdowns:
        keys = ("driver_dense_s", "driver_local_attention_s", "driver_wait_s")
        merged = {k: statistics.fmean(b[k] for b in breakdowns) for k in keys}
        merged["worker_attention_s"] = {
            w: statistics.fmean(b["worker_attention_s"][w] for b in breakdowns)
            for w in breakdowns[0]["worker_attention_s"]
        }
    return {
        "step_median_s": statistics.median(times),
        "step_p20_s": float(np.percentile(times, 20)),
        "steps_s": times,
        "context_mean": statistics.fmean(r["context_mean"] for r in runs),
        "tokens": runs[0]["tokens"],
        "breakdown": merged,
    }


def best_within(measured: list[float], tol: float = 0.10) -> int:
    """How many of a row's measured steps one prediction p can have within `tol` (|p / m - 1| <=
    tol): the most a perfect, constant prediction could reach over runs of a noisy engine."""
    edges = [e for m in measured for e in (m * (1 - tol), m * (1 + tol))]
    return max(sum(abs(p / m - 1) <= tol + 1e-12 for m in measured) for p in edges)


def across_runs(paths: list[str]) -> int:
    """Each topology over result files of one calibration: measured medians, their spread, the
    simulator's runs within 10%, and best_within (what the engine's own spread allows)."""
    import json
    from pathlib import Path

    runs = [{r["config"]: r for r in json.loads(Path(path).read_text())["rows"]} for path in paths]
    totals = [0, 0, 0, 0]  # row-runs: simulator within 10%, best possible; rows: all runs, best possible
    for name in runs[0]:
        rows = [run[name] for run in runs if name in run]
        measured = [r["measured_s"] for r in rows]
        sim = sum(abs(r["rel_error"]) <= 0.10 for r in rows)
        best = best_within(measured)
        totals = [totals[0] + sim, totals[1] + best, totals[2] + (sim == len(rows)), totals[3] + (best == len(rows))]
        print(f"{name:46s} measured {' / '.join(f'{m * 1e3:.1f}' for m in measured)} ms "
              f"(spread x{max(measured) / min(measured):.2f}), predicted {rows[0]['predicted_s'] * 1e3:.1f} ms: "
              f"simulator within 10% on {sim}/{len(rows)}, best possible {best}/{len(rows)}")
    n = sum(len(run) for run in runs)
    print(f"row-runs within 10%: simulator {totals[0]}/{n}, best possible {totals[1]}/{n}; "
          f"rows within 10% in every run: simulator {totals[2]}/{len(runs[0])}, best possible {totals[3]}/{len(runs[0])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M GGUF")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all configurations")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool-threshold", type=int, default=64)
    p.add_argument("--tokens-per-pool-worker", type=int, default=32)
    p.add_argument("--topologies", nargs="+", default=list(DEFAULT_TOPOLOGIES),
                   help="keys of topologies(): single, tp3, pp2, pool-MODE-xN[-mb2], lamina-MODE-x2, lamina-shard-x1, afd-1-1[-mb2]")
    p.add_argument("--sparse-share", type=float, default=0.25, help="sparse row: share of each KV head's blocks")
    p.add_argument("--sparse-input-len", type=int, default=1024, help="sparse row (and its dense beside it): prompt")
    p.add_argument("--calibration", default=None, help="reuse this CPU calibration instead of running one")
    p.add_argument(
        "--twin", choices=("tiny", "model"), default="model",
        help="the calibration's engine decode: a tiny model, or the target cut to 1, 4 and 8 layers (CPU)",
    )
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    p.add_argument("--calibrate-only", action="store_true", help="write the calibration and stop")
    p.add_argument("--across", nargs="+", default=None, metavar="JSON",
                   help="no run: each topology over these result files (one calibration's runs) against "
                        "what the engine's own spread allows")
    ns = p.parse_args(argv)
    if ns.across:
        return across_runs(ns.across)

    import torch

    from fapool.bench.calibrate import calibrate
    from fapool.bench.results import environment, write_result
    from fapool.entrypoints.llm import LLM
    from fapool.models.loader import load_model_config, resolve_model
    from fapool.sim.calibrate import apply_calibration, load_calibration, summary_lines, write_calibration
    from fapool.sim.cost_model import CostModel
    from fapool.sim.hardware import get_hardware
    from fapool.sim.validate import error_summary, predict_step

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    out_dir = ns.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    model_config = load_model_config(resolve_model(ns.model))
    t0 = time.perf_counter()
    if ns.calibration:
        cal_path = ns.calibration
        cal = load_calibration(cal_path)
    else:
        cpu0, t_cal = cpu_seconds(), time.perf_counter()
        cal = calibrate(
            device="cpu", threads=1, model=model_config, pool=True, twin=ns.twin,
            progress=lambda s: print(s, flush=True),
        )
        (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t_cal
        others_s = max(0.0, (busy1 - cpu0[0]) - (own1 - cpu0[1]))
        share = others_s / (wall * (os.cpu_count() or 1))
        cal["other_processes"] = {"cpu_s": others_s, "share_of_machine": share}
        print(f"other processes during the calibration: {others_s:.1f} CPU-s, "
              f"{cal['other_processes']['share_of_machine']:.1%} of the machine")
        cal_path = os.path.join(out_dir, f"sim_calibration_cpu-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json")
        write_calibration(cal, cal_path)
        cal = load_calibration(cal_path)
    for line in summary_lines(cal):
        print(line)
    if ns.calibrate_only:
        print("wrote", cal_path)
        return 0
    calib_s = time.perf_counter() - t0
    cost = CostModel(model_config, apply_calibration(get_hardware("cpu"), cal))

    # One multi-process engine at a time (a process holds one process group). The single
    # process stays up and is measured in turn with each, `repeats` rounds: drifting load from
    # other processes then falls on both alike, and the ratio to the single process at the same
    # time is a load-robust check beside the absolute times.
    ns.tmp_dir = tempfile.mkdtemp(prefix="sim_vs_engine_")
    table = topologies(ns, model_config)
    input_len = {k: ns.sparse_input_len if k == "sparse" else ns.input_len for k in table}
    unknown = [k for k in ns.topologies if k not in table]
    if unknown:
        p.error(f"unknown topologies {unknown}; known: {sorted(table)}")
    keys = ["single"] + [k for k in ns.topologies if k != "single"]
    rows, reference = [], None
    runs: dict[str, list[dict]] = {}
    beside: dict[str, list[dict]] = {}
    probes = [gemm_probe(model_config)]
    cpu0, t_measure = cpu_seconds(), time.perf_counter()
    with LLM(ns.model, device="cpu", dtype="float32", kv_cache_memory=256 << 20) as single:
        torch.set_num_threads(1)
        for key in keys[1:]:
            with LLM(ns.model, device="cpu", dtype="float32", kv_cache_memory=256 << 20, **table[key][1]) as llm:
                torch.set_num_threads(1)
                for _ in range(ns.repeats):
                    probes.append(gemm_probe(model_config))
                    beside.setdefault(key, []).append(measure(single, ns.batch, input_len[key], ns.steps, ns.warmup))
                    runs.setdefault(key, []).append(measure(llm, ns.batch, input_len[key], ns.steps, ns.warmup))
        if all(input_len[k] != ns.input_len for k in keys[1:]):  # nothing beside it at this length
            runs["single"] = [measure(single, ns.batch, ns.input_len, ns.steps, ns.warmup) for _ in range(ns.repeats)]
    # Every engine process has exited (and been reaped) here, so its CPU time is ours.
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t_measure
    others_s = max(0.0, (busy1 - cpu0[0]) - (own1 - cpu0[1]))
    share = others_s / (wall * (os.cpu_count() or 1))
    others = {"cpu_s": others_s, "share_of_machine": share, "wall_s": wall}
    if "single" not in runs:
        runs["single"] = [r for k, rs in beside.items() for r in rs if input_len[k] == ns.input_len]
    for key in keys:
        name, extra, strategy = table[key]
        m = _merge(runs[key])
        reference = reference or m["tokens"]
        ctx = round(m["context_mean"])
        sc = predict_step(cost, strategy, ns.batch, ctx)
        pred, pred_dev = sc.duration, predict_step(cost.device_only(), strategy, ns.batch, ctx).duration
        predicted_parts = {"busy_s": [float(v) for v in sc.busy], "comm_s": [float(v) for v in sc.comm]}
        row = {
            "config": name,
            "topology": key,
            **extra,
            # the sparse row against the dense single process at its own prompt length
            "tokens_equal_single_process": m["tokens"] == (_merge(beside[key])["tokens"] if key == "sparse" else reference),
            "context_mean": m["context_mean"],
            "measured_s": m["step_median_s"],
            "measured_p20_s": m["step_p20_s"],
            "steps_s": m["steps_s"],
            "predicted_s": pred,
            "predicted_device_s": pred_dev,
            "measured_breakdown": m["breakdown"],
            "predicted_parts": predicted_parts,
            "rel_error": (pred - m["step_median_s"]) / m["step_median_s"],
            "rel_error_vs_p20": (pred - m["step_p20_s"]) / m["step_p20_s"],
        }
        if key != "single":  # against the single process measured in the same rounds
            ref = _merge(beside[key])
            single_pred = predict_step(cost, table["single"][2], ns.batch, round(ref["context_mean"])).duration
            row["single_beside_s"] = ref["step_median_s"]
            row["measured_ratio"] = m["step_median_s"] / ref["step_median_s"]
            row["predicted_ratio"] = pred / single_pred
            row["ratio_rel_error"] = row["predicted_ratio"] / row["measured_ratio"] - 1
        rows.append(row)
        print(
            f"{name:44s} measured {row['measured_s'] * 1e3:7.1f} ms (p20 {row['measured_p20_s'] * 1e3:6.1f}) "
            f"predicted {pred * 1e3:7.1f} ms (device {pred_dev * 1e3:6.1f}) err {row['rel_error']:+6.1%} "
            f"(vs p20 {row['rel_error_vs_p20']:+6.1%}) same tokens {row['tokens_equal_single_process']}"
            + (
                f"; x single beside it: measured {row['measured_ratio']:.2f} predicted {row['predicted_ratio']:.2f}"
                if key != "single"
                else ""
            ),
            flush=True,
        )
        b = m["breakdown"]
        if b:
            print(
                f"    rank 0 measured: dense {b['driver_dense_s'] * 1e3:.1f} + local attention "
                f"{b['driver_local_attention_s'] * 1e3:.1f} + wait {b['driver_wait_s'] * 1e3:.1f} ms; predicted busy "
                f"{[round(v * 1e3, 1) for v in predicted_parts['busy_s']]} ms; other ranks measured "
                f"{[round(v * 1e3, 1) for v in b['worker_attention_s'].values()]} ms",
                flush=True,
            )
    cal_probe = [x["s"] for x in cal["samples"]["gemm"]
                 if (x["m"], x["n"], x["k"]) == (probes[0]["m"], probes[0]["n"], probes[0]["k"])]
    drift = {
        "calibration_s": cal_probe[0] if cal_probe else None,
        "during_measurement_s": [p_["s"] for p_ in probes],
        "ratio_median": statistics.median(p_["s"] for p_ in probes) / cal_probe[0] if cal_probe else None,
    }
    if drift["ratio_median"]:
        print(f"machine drift probe (gate/up GEMM, m=4): x{drift['ratio_median']:.2f} of the calibration's time "
              f"(range x{min(drift['during_measurement_s']) / cal_probe[0]:.2f}..x{max(drift['during_measurement_s']) / cal_probe[0]:.2f})")
    s = error_summary(rows)
    s_p20 = error_summary([{**r, "rel_error": r["rel_error_vs_p20"]} for r in rows])
    print(f"other processes: {others['cpu_s']:.1f} CPU-s over {others['wall_s']:.0f} s, "
          f"{others['share_of_machine']:.1%} of the machine")
    print("vs median step:", s)
    print("vs p20 step:", s_p20)
    result = {
        "env": environment("cpu"),
        "load_average": os.getloadavg(),
        "load_average_start": load_start,
        "other_processes": others,
        "gemm_drift_probe": drift,
        "shapes": {
            "model": ns.model or "embedded SmolLM2-135M (float32)",
            "batch": ns.batch,
            "input_len": ns.input_len,
            "steps": ns.steps,
            "repeats": ns.repeats,
            "warmup": ns.warmup,
            "pool_threshold": ns.pool_threshold,
            "topologies": keys,
            "tokens_per_pool_worker": ns.tokens_per_pool_worker,
            "threads_per_process": 1,
            "calibration_twin": ns.twin if not ns.calibration else "from the given calibration",
        },
        "calibration": os.path.abspath(cal_path),
        "calibration_s": calib_s,
        "rows": rows,
        "summary": s,
        "summary_vs_p20": s_p20,
    }
    load = os.getloadavg()[0]
    summary = (
        f"simulated vs measured decode step, CPU engine topologies (SmolLM2, batch {ns.batch}, "
        f"ctx ~{rows[0]['context_mean']:.0f}, 1 thread/process, load avg {load:.1f}, other processes "
        f"{others['share_of_machine']:.1%} of the machine): within 10% on "
        f"{s['within_10pct']}/{s['rows']} (max {s['max_abs_rel_error']:.0%}); "
        + ", ".join(f"{r['topology']} {r['measured_s'] * 1e3:.0f}->{r['predicted_s'] * 1e3:.0f} ms" for r in rows)
        + "; x single measured / predicted "
        + ", ".join(f"{r['topology']} {r['measured_ratio']:.2f}/{r['predicted_ratio']:.2f}" for r in rows[1:])
    )
    print(summary)
    print("wrote", write_result("sim_vs_engine_cpu", result, summary, out_dir=ns.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
