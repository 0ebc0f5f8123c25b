"""Simulator vs the real engine (issue 6) on the CPU: the single-process engine and the
multi-process attention pool (gloo), predicted vs measured decode step time.

One run does everything here:
  1. `fapool calibrate --pool` on this CPU (torch threads 1, as the pool's processes use):
     kernel rooflines, gloo send/recv and all-reduce, the tiny-engine decode that fits the
     fixed per-layer / per-step costs and the host model, and the tiny-engine pool run (one
     worker) that fits the pool machinery's costs; the cores are recorded for the contention
     model. Written beside the result JSON.
  2. The engine on the embedded SmolLM2-135M (float32) for each configuration: single
     process; pool shard x1 and x2 with 2 micro-batches (overlap); shard x1 and x2 with 1.
     `batch` prompts of `input_len` random tokens; after the prefill and a warm-up, each
     decode step of the whole batch is timed. All engines stay up and are measured in turns
     (`--repeats` rounds), so drifting load from other processes falls on all alike.
  3. The simulator's step for each: StaticTPPP(1, 1) or FAPool(base 1, pool A, threshold,
     tokens per worker, shard mode, overlap = micro-batches > 1) priced at the same
     batch and mean context, whole step (host model) and device only.

    PYTHONPATH=. python benchmarks/sim_vs_engine_cpu.py [--batch 4 --input-len 96 ...]

Nothing here is fitted to the engine rows. With --twin model (default) the engine part of the
calibration decodes SmolLM2's own layer shapes cut to 1, 4 and 8 layers (random weights, batches
1/4/8 at contexts 32/256): on a CPU a layer's fixed costs (norms, rotary, residuals, the
attention call) depend on its widths and on the caches its weights evict, which a tiny layer
does not show; the 30-layer model and its real weights never run there. --twin tiny is the
previous calibration (a 256-wide twin). The pool terms come from a tiny twin with at most two
workers.
The measured step is reported as median and 20th percentile (the machine may be shared:
other processes only ever add time); errors are against the median. Each engine process
has one thread, and a pool of A workers runs A + 1 processes on the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fapool


def configs(ns) -> list[tuple[str, dict]]:
    pool = dict(pool_threshold=ns.pool_threshold, tokens_per_pool_worker=ns.tokens_per_pool_worker, pool_mode="shard")
    out: list[tuple[str, dict]] = [("single process", {})]
    for mb in (2, 1):
        for a in ns.workers:
            out.append((f"pool shard x{a}, {mb} micro-batch{'es' if mb > 1 else ''}", dict(attention_workers=a, micro_batches=mb, **pool)))
    return out


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
    import torch.nn.functional as F

    from fapool.sim.calibrate import _copies, _cycle, model_linear_shapes, time_op

    n, k = model_linear_shapes(model_config)[2]
    ws = [torch.randn(n, k) for _ in range(_copies(n * k * 4))]
    a = torch.randn(m, k)
    return {"m": m, "n": n, "k": k, "s": time_op(_cycle(lambda w: F.linear(a, w), ws), torch.device("cpu"))}


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
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calibration", default=None, help="reuse this CPU calibration instead of running one")
    p.add_argument(
        "--twin", choices=("tiny", "model"), default="model",
        help="the calibration's engine decode: a tiny model, or the target cut to 1, 4 and 8 layers (CPU)",
    )
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    ns = p.parse_args(argv)

    import torch

    from fapool.bench.results import environment, write_result
    from fapool.entrypoints.llm import LLM
    from fapool.models.loader import load_model_config, resolve_model
    from fapool.sim.calibrate import apply_calibration, calibrate, load_calibration, summary_lines, write_calibration
    from fapool.sim.cost_model import CostModel
    from fapool.sim.hardware import get_hardware
    from fapool.sim.strategies import FAPool
    from fapool.sim.validate import error_summary, predict_pool_cost, predict_pool_step, predict_tpot

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
        cal = calibrate(
            device="cpu", threads=1, model=model_config, pool=True, twin=ns.twin,
            progress=lambda s: print(s, flush=True),
        )
        cal_path = os.path.join(out_dir, f"sim_calibration_cpu-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json")
        write_calibration(cal, cal_path)
        cal = load_calibration(cal_path)
    for line in summary_lines(cal):
        print(line)
    calib_s = time.perf_counter() - t0
    cost = CostModel(model_config, apply_calibration(get_hardware("cpu"), cal))

    # One pool engine at a time (a process holds one process group). The single-process engine
    # stays up and is measured in turn with each pool engine, `repeats` rounds: drifting load
    # from other processes then falls on both alike, and the pool / single ratio at the same
    # time is a load-robust check beside the absolute times.
    rows, reference = [], None
    runs: dict[str, list[dict]] = {}
    beside: dict[str, list[dict]] = {}
    probes = [gemm_probe(model_config)]
    single_name, *_ = (name for name, _ in configs(ns))
    with LLM(ns.model, device="cpu", dtype="float32", kv_cache_memory=256 << 20) as single:
        torch.set_num_threads(1)
        for name, extra in configs(ns)[1:]:
            with LLM(ns.model, device="cpu", dtype="float32", kv_cache_memory=256 << 20, **extra) as llm:
                torch.set_num_threads(1)
                for _ in range(ns.repeats):
                    probes.append(gemm_probe(model_config))
                    beside.setdefault(name, []).append(measure(single, ns.batch, ns.input_len, ns.steps, ns.warmup))
                    runs.setdefault(name, []).append(measure(llm, ns.batch, ns.input_len, ns.steps, ns.warmup))
    runs[single_name] = [r for rs in beside.values() for r in rs]
    for name, extra in configs(ns):
        m = _merge(runs[name])
        reference = reference or m["tokens"]
        ctx = int(round(m["context_mean"]))
        if extra:
            pool = FAPool(
                base_tp=1,
                pool_size=extra["attention_workers"],
                threshold=ns.pool_threshold,
                tokens_per_worker=ns.tokens_per_pool_worker,
                mode="shard",
                overlap=extra["micro_batches"] > 1,
                max_batch=ns.batch,
            )
            sc = predict_pool_cost(cost, pool, ns.batch, ctx)
            pred, pred_dev = sc.duration, predict_pool_step(cost.device_only(), pool, ns.batch, ctx)
            predicted_parts = {"driver_busy_s": float(sc.busy[0]), "driver_comm_s": float(sc.comm[0]),
                               "worker_busy_s": [float(v) for v in sc.busy[1:]],
                               "worker_comm_s": [float(v) for v in sc.comm[1:]]}
        else:
            pred = predict_tpot(cost, ns.batch, ctx)
            pred_dev = predict_tpot(cost.device_only(), ns.batch, ctx)
            predicted_parts = None
        row = {
            "config": name,
            **extra,
            "tokens_equal_single_process": m["tokens"] == reference,
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
        if extra:  # against the single process measured in the same rounds
            ref = _merge(beside[name])
            single_pred = predict_tpot(cost, ns.batch, int(round(ref["context_mean"])))
            row["single_beside_s"] = ref["step_median_s"]
            row["measured_ratio"] = m["step_median_s"] / ref["step_median_s"]
            row["predicted_ratio"] = pred / single_pred
            row["ratio_rel_error"] = row["predicted_ratio"] / row["measured_ratio"] - 1
        rows.append(row)
        print(
            f"{name:32s} measured {row['measured_s'] * 1e3:7.1f} ms (p20 {row['measured_p20_s'] * 1e3:6.1f}) "
            f"predicted {pred * 1e3:7.1f} ms (device {pred_dev * 1e3:6.1f}) err {row['rel_error']:+6.1%} "
            f"(vs p20 {row['rel_error_vs_p20']:+6.1%}) same tokens {row['tokens_equal_single_process']}"
            + (
                f"; x single beside it: measured {row['measured_ratio']:.2f} predicted {row['predicted_ratio']:.2f}"
                if extra
                else ""
            ),
            flush=True,
        )
        b = m["breakdown"]
        if b and predicted_parts:
            print(
                f"    driver measured: dense {b['driver_dense_s'] * 1e3:.1f} + local attention "
                f"{b['driver_local_attention_s'] * 1e3:.1f} + wait {b['driver_wait_s'] * 1e3:.1f} ms; predicted busy "
                f"{predicted_parts['driver_busy_s'] * 1e3:.1f} + comm {predicted_parts['driver_comm_s'] * 1e3:.1f} ms; "
                f"workers' attention measured {[round(v * 1e3, 1) for v in b['worker_attention_s'].values()]} "
                f"predicted {[round(v * 1e3, 1) for v in predicted_parts['worker_busy_s']]} ms",
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
    print("vs median step:", s)
    print("vs p20 step:", s_p20)
    result = {
        "env": environment("cpu"),
        "load_average": os.getloadavg(),
        "load_average_start": load_start,
        "gemm_drift_probe": drift,
        "shapes": {
            "model": ns.model or "embedded SmolLM2-135M (float32)",
            "batch": ns.batch,
            "input_len": ns.input_len,
            "steps": ns.steps,
            "repeats": ns.repeats,
            "warmup": ns.warmup,
            "pool_threshold": ns.pool_threshold,
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
        f"simulated vs measured decode step, CPU engine + gloo pool (SmolLM2, batch {ns.batch}, ctx ~{rows[0]['context_mean']:.0f}, "
        f"1 thread/process, load avg {load:.1f}): within 10% on {s['within_10pct']}/{s['rows']} (max {s['max_abs_rel_error']:.0%}); "
        + ", ".join(f"{r['config']} {r['measured_s'] * 1e3:.0f}->{r['predicted_s'] * 1e3:.0f} ms" for r in rows)
        + "; pool/single measured x"
        + "/".join(f"{r['measured_ratio']:.2f}" for r in rows[1:])
        + " vs predicted x"
        + "/".join(f"{r['predicted_ratio']:.2f}" for r in rows[1:])
    )
    print(summary)
    print("wrote", write_result("sim_vs_engine_cpu", result, summary, out_dir=ns.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
