"""The calibration file (`fapool calibrate`'s JSON, schema 3) and the fits that turn measured samples
into the cost model's terms: roofline rates, the engine's fixed and host terms, the pool's and the
ranks' overheads; `apply_calibration` puts them in a HardwareProfile. The measuring is
fapool/bench/calibrate.py's. Method: docs/simulator.md.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HardwareProfile, HostProfile, LinkProfile, PoolOverheads, RankOverheads
from fapool.sim.strategies import AFD, FAPool, StaticTPPP
from fapool.sim.validate import pool_step_inputs, predict_step

SCHEMA = 3  # the one schema read; older files in benchmarks/results were converted once
REQUIRED = ("gemm", "attention", "engine", "pool", "cpu_cores")  # engine / pool may be null
HOST_TERMS = ("step_s", "per_seq_s", "per_kv_token_s")
WORKER_TERMS = ("worker_call_s", "worker_per_seq_s")
DRIVER_TERMS = ("driver_mb_s", "driver_pool_mb_s", "driver_route_s", "driver_step_s")
POOL_MODES = ("shard", "replicate", "head")


def fit_roofline(flops, nbytes, seconds, overheads=None) -> dict:
    """Fit time = o + max(flops / F, bytes / B) by search: F and B over the rates each sample implies,
    o over `overheads` (default: 24 values from 0 to 95% of the fastest sample)."""
    f, b, t = (np.asarray(x, dtype=np.float64) for x in (flops, nbytes, seconds))
    best = None
    if overheads is None:
        overheads = np.linspace(0.0, 0.95 * t.min(), 24)
    for o in overheads:
        o = min(float(o), 0.95 * float(t.min()))
        rest = t - o
        for F in np.unique(f / rest):
            for B in np.unique(b / rest):
                err = float(np.mean(np.abs(np.log((o + np.maximum(f / F, b / B)) / t))))
                key = (round(err, 9), -B, -F)
                if best is None or key < best[0]:
                    best = (key, o, F, B, err)
    _, o, F, B, err = best
    return {"overhead_s": float(o), "flops_per_s": float(F), "bytes_per_s": float(B), "mean_abs_log_err": err}


def _fit_samples(samples: list[dict], overheads=None) -> dict:
    return fit_roofline(*([s[k] for s in samples] for k in ("flops", "bytes", "s")), overheads)


def fit_gemm_by_m(samples: list[dict], overhead: float) -> list[dict]:
    """Per token count m, the GEMM's own (F, B) at the global fit's overhead (small m reach other rates)."""
    out = []
    for m in sorted({s["m"] for s in samples}):
        fit = _fit_samples([s for s in samples if s["m"] == m], [overhead])
        out.append({"m": m, **{k: fit[k] for k in ("flops_per_s", "bytes_per_s", "mean_abs_log_err")}})
    return out


def fit_linear(x, seconds) -> dict:
    """Fit time = latency + x / bandwidth by least squares (non-negative latency)."""
    x, t = np.asarray(x, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    slope, intercept = np.polyfit(x, t, 1)
    slope, intercept = max(slope, 1e-15), max(intercept, 0.0)
    err = float(np.mean(np.abs(np.log((intercept + slope * x) / t))))
    return {"latency_s": float(intercept), "bytes_per_s": float(1.0 / slope), "mean_abs_log_err": err}


def fit_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ~ x @ c with c >= 0: the best fit over column subsets with c >= 0."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            c, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(c < 0):
                continue
            err = float(np.sum((x[:, cols] @ c - y) ** 2))
            if err < best_err:
                best = np.zeros(n)
                best[list(cols)] = c
                best_err = err
    return best


def fit_host(n_seqs: Sequence[float], kv_tokens: Sequence[float], host_s: Sequence[float]) -> dict:
    """step_s + per_seq_s * n + per_kv_token_s * kv fitted to measured host seconds."""
    n, kv, y = (np.asarray(v, dtype=np.float64) for v in (n_seqs, kv_tokens, host_s))
    if len(y) < 3:
        raise SimInputError(f"the host fit needs at least 3 measured steps, got {len(y)}")
    x = np.stack([np.ones_like(n), n, kv], axis=1)
    c = fit_nonneg(x, y)
    err = float(np.mean(np.abs(x @ c - y) / y))
    return {**{name: float(v) for name, v in zip(HOST_TERMS, c)}, "mean_abs_rel_err": err}


def fit_launch(layers: Sequence[int], forward_s: Sequence[float]) -> dict:
    """Eager forward seconds ~ launch_step_s + launch_layer_s * layers (non-negative)."""
    layers_a, t = np.asarray(layers, dtype=np.float64), np.asarray(forward_s, dtype=np.float64)
    c = fit_nonneg(np.stack([np.ones_like(layers_a), layers_a], axis=1), t)
    return {"launch_step_s": float(c[0]), "launch_layer_s": float(c[1])}


def fit_device_fixed(samples: list[dict], cost: CostModel, depths: Sequence[int]) -> dict:
    """The device's fixed seconds a layer and a step beyond the rooflines, from engine decode samples at
    `depths`: per (batch, context) the slope and intercept of device time over depth, less what `cost`
    (the shallowest engine model, kernel fits alone, no host) prices."""
    lo = depths[0]
    layer_res, step_res, by_point = [], [], {}
    for s in samples:
        by_point.setdefault((s["batch"], s["context"]), {})[s["layers"]] = s
    for (batch, _), pair in sorted(by_point.items()):
        kv = pair[lo]["kv_tokens"]
        modelled_layer = cost.dense_layer(batch)[0] + float(cost.attention(kv, kv, batch))
        # Device time over depth by least squares (with two depths: the line through both).
        slope, intercept = np.polyfit(depths, [pair[d]["device_s"] for d in depths], 1)
        layer_res.append(float(slope) - modelled_layer)
        # The intercept of device time over depth, less the modelled LM head.
        step_res.append(float(intercept) - float(cost.lm_head(batch)))
    kvs = [pair[lo]["kv_tokens"] for _, pair in sorted(by_point.items())]
    line = fit_nonneg(np.stack([np.ones(len(kvs)), kvs], axis=1), np.asarray(layer_res))
    return {"layer_fixed_s": float(line[0]), "step_fixed_s": max(0.0, float(np.median(step_res))),
            "layer_residuals_s": list(map(float, layer_res)), "layer_residual_per_kv_token_s": float(line[1]),
            "step_residuals_s": list(map(float, step_res))}


def _modelled(cost, sample: dict):
    """(driver busy, per-worker busy, calls, seqs, routes, pool micro-batches, micro-batches) of a
    sample priced with zero pool terms and no contention."""
    pool = FAPool(base_tp=1, pool_size=sample["workers"], threshold=sample["threshold"], mode="shard",
                  tokens_per_worker=sample["tokens_per_worker"], overlap=sample["micro_batches"] > 1,
                  max_batch=sample["batch"])
    step, ledger = pool_step_inputs(cost, pool, sample["batch"], round(sample["context_mean"]))
    sc = pool.step_cost(cost, step, ledger)
    calls, seqs, routes, pool_mbs, n_mb = pool.pool_calls(step, ledger)
    if not np.any(sc.busy[1:] > 0):
        routes, pool_mbs, n_mb = 0, 0, 1
    return float(sc.busy[0]), sc.busy[1:], calls, seqs, routes, pool_mbs, n_mb


def fit_pool_terms(samples: list[dict], cost) -> dict:
    """Fit PoolOverheads' terms to pool samples; `cost` has zero pool terms and no cpu_cores."""
    if len(samples) < 3:
        raise SimInputError(f"the pool fit needs at least 3 samples, got {len(samples)}")
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


def pool_kind(kind: str) -> tuple[str, int] | None:
    """A calibration pool engine's (mode, micro-batches) from its kind ("shard", "head-mb2"), else None."""
    mode, mb2 = kind.removesuffix("-mb2"), kind.endswith("-mb2")
    return (mode, 2 if mb2 else 1) if mode in POOL_MODES else None


def rank_strategy(kind: str, n: int, batch: int):
    """The simulator's strategy for a calibration engine: ("tp", ranks), ("pp", stages), ("afd", micro-batches) or
    (a pool mode, workers) with one micro-batch ("MODE-mb2": two), the pool holding the KV past 32 tokens."""
    if kind in ("tp", "pp"):
        return StaticTPPP(tp=n if kind == "tp" else 1, pp=n if kind == "pp" else 1, max_batch=batch)
    if pool := pool_kind(kind):
        return FAPool(base_tp=1, pool_size=n, threshold=32, tokens_per_worker=32, mode=pool[0], overlap=pool[1] > 1,
                      max_batch=batch)
    return AFD(r=1, f_tp=1, max_batch_per_attn=batch, overlap=n > 1)


def fit_rank_terms(samples: list[dict], cost) -> dict:
    """RankOverheads from samples {kind, n, layers, batch, context, step_s[, single_s: a single process
    measured beside it]}; `cost` has no rank terms.
    In turn, each from the slope over depth of (measured - modelled) step: AFD with one micro-batch
    (a serial chain: two exchanges a layer) gives exchange_s; AFD with two (both sides compute at once)
    concurrent_stretch; TP at n ranks its two all-reduces a layer; the intercepts a step's extra by
    processes; a pool engine's slope and intercept, averaged over its modes, pool_extra_s by workers
    (pool_mb2_extra_s from the engines of two micro-batches)."""

    def line(kind: str, n: int, ranks: RankOverheads) -> tuple[float, float]:
        rows = [s for s in samples if (s["kind"], s["n"]) == (kind, n)]
        if len({s["layers"] for s in rows}) < 2:
            raise SimInputError(f"the rank fit needs {kind} {n} at two depths")
        res = []
        for s in rows:
            c = CostModel(cost.model.replace(num_hidden_layers=s["layers"]), cost.hw.replace(ranks=ranks))
            # Measured in the single process's units: scaled by its modelled / measured step beside it.
            single = predict_step(c, StaticTPPP(tp=1, pp=1), s["batch"], s["context"]).duration
            scale = single / s["single_s"] if "single_s" in s else 1.0
            res.append(scale * s["step_s"] - predict_step(c, rank_strategy(kind, n, s["batch"]), s["batch"],
                                                          s["context"]).duration)
        slope, intercept = np.polyfit([s["layers"] for s in rows], res, 1)
        return float(slope), float(intercept)

    slope = lambda *a: line(*a)[0]
    ranks = RankOverheads(exchange_s=max(0.0, slope("afd", 1, RankOverheads()) / 2))
    lo, hi = 1.0, 3.0  # the stretch that leaves no slope: bisection (the slope falls as it grows)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope("afd", 2, replace(ranks, concurrent_stretch=mid)) > 0 else (lo, mid)
    ranks = replace(ranks, concurrent_stretch=lo)
    tps = sorted({s["n"] for s in samples if s["kind"] == "tp"})
    ranks = replace(ranks, allreduce_extra_s=tuple((n, max(0.0, slope("tp", n, ranks) / 2)) for n in tps))
    # What is left at zero depth, per step, by the number of processes (TP: n; AFD 1:1: 2).
    fits = {(k, n): line(k, n, ranks) for k, n in sorted({(s["kind"], s["n"]) for s in samples})}
    by_procs: dict[int, list[float]] = {}
    # a pool step's whole rest, slope and intercept, by (micro-batches, workers)
    by_workers: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for (kind, n), fit in fits.items():
        if pool_ := pool_kind(kind):
            by_workers.setdefault((pool_[1], n), []).append(fit)
        elif kind != "pp":
            by_procs.setdefault(n if kind == "tp" else 2, []).append(fit[1])
    pool = {mb: [[n, *(max(0.0, float(v)) for v in np.mean(f, axis=0))] for (m, n), f in sorted(by_workers.items())
                 if m == mb] for mb in (1, 2)}
    steps = [[p, max(0.0, float(np.mean(v)))] for p, v in sorted(by_procs.items())]
    # PP at n stages: what its step leaves beyond everything above, a layer and a step.
    ranks = replace(ranks, step_extra_s=tuple((p, v) for p, v in steps))
    pp = [[n, *(max(0.0, v) for v in line("pp", n, ranks))] for k, n in sorted(fits) if k == "pp"]
    return {"exchange_s": ranks.exchange_s, "concurrent_stretch": ranks.concurrent_stretch,
            "allreduce_extra_s": [list(e) for e in ranks.allreduce_extra_s],
            "step_extra_s": steps, "pool_extra_s": pool[1], "pool_mb2_extra_s": pool[2], "pp_extra_s": pp,
            "layer_residuals_s": {f"{k}{n}": v[0] for (k, n), v in fits.items()}}


def fit_sparse(samples: list[dict]) -> dict:
    """Sparse decode seconds of one layer's call = call_s + per_row_s x rows + per_block_s x summary
    blocks scored + per_token_s x KV tokens read (non-negative least squares)."""
    x = np.array([[1.0, s["rows"], s["blocks"], s["tokens"]] for s in samples])
    y = np.array([s["s"] for s in samples])
    c = fit_nonneg(x, y)
    err = float(np.mean(np.abs(x @ c / y - 1)))
    return {**dict(zip(("call_s", "per_row_s", "per_block_s", "per_token_s"), map(float, c), strict=True)),
            "mean_abs_rel_err": err, "samples": samples}


def write_calibration(cal: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cal, indent=2) + "\n")


def load_calibration(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"calibration file not found: {path}")
    try:
        cal = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SimInputError(f"{path}: not JSON ({exc})") from exc
    missing = [k for k in REQUIRED if k not in cal]
    if cal.get("schema") != SCHEMA or missing:
        why = f"missing {', '.join(missing)}" if missing else f"schema {cal.get('schema')!r}"
        raise SimInputError(f"{path}: not a fapool calibration of schema {SCHEMA} ({why}); "
                            "rerun `fapool calibrate`")
    cal["_path"] = str(path)
    return cal


def attn_table(samples: list[dict]) -> tuple[tuple[float, float], ...]:
    """(bytes, seconds) of decode-attention samples sorted by bytes, equal sizes averaged and
    times made non-decreasing (more KV never reads faster; a dip is noise)."""
    by: dict[float, list[float]] = {}
    for s in samples:
        by.setdefault(float(s["bytes"]), []).append(float(s["s"]))
    out, floor = [], 0.0
    for b in sorted(by):
        floor = max(floor, sum(by[b]) / len(by[b]))
        out.append((b, floor))
    return tuple(out)


def _fields(cls, section: dict) -> dict:
    """A dataclass's fields from a calibration section, cast to the field's type."""
    return {f.name: type(f.default)(section[f.name]) for f in fields(cls)}


def apply_calibration(hw: HardwareProfile, cal: dict) -> HardwareProfile:
    """The profile with fitted rates in place of the preset's (memory and, unless measured,
    the interconnect stay the preset's), and the engine's fixed costs, host and pool terms."""
    g, a = cal["gemm"], cal["attention"]
    changes = {
        "gemm_flops": g["flops_per_s"], "gemm_bandwidth": g["bytes_per_s"],
        "kernel_overhead": g["overhead_s"], "attn_overhead": a["overhead_s"],
        "attn_by_bytes": attn_table(cal.get("samples", {}).get("decode") or [])
        if a.get("decode_kernel") else (),
        "gemm_by_m": tuple((int(r["m"]), float(r["flops_per_s"]), float(r["bytes_per_s"]))
                           for r in g.get("by_m", [])),
        "attn_flops": a.get("prefill_flops_per_s", a["flops_per_s"]), "attn_bandwidth": a["bytes_per_s"],
        "dtype_bytes": int(cal.get("dtype_bytes", hw.dtype_bytes)),
        "source": f"calibration {cal.get('_path', '')} ({cal.get('device_name', '?')})",
    }
    if eng := cal.get("engine"):
        changes["layer_fixed_s"] = eng["device_fixed"]["layer_fixed_s"]
        changes["step_fixed_s"] = eng["device_fixed"]["step_fixed_s"]
        changes["host"] = HostProfile(**_fields(HostProfile, eng["host"]))
    if cal["pool"]:
        changes["pool"] = PoolOverheads(**_fields(PoolOverheads, cal["pool"]))
    if r := cal.get("ranks"):  # absent from calibrations made before the rank terms
        pairs = lambda key: tuple((int(n), *map(float, v)) for n, *v in r.get(key, ()))
        changes["ranks"] = RankOverheads(float(r["exchange_s"]), float(r["concurrent_stretch"]),
                                         pairs("allreduce_extra_s"), pairs("step_extra_s"), pairs("pool_extra_s"),
                                         pairs("pp_extra_s"), pairs("pool_mb2_extra_s"))
    if sp := cal.get("sparse"):
        changes["sparse_decode"] = (sp["call_s"], sp["per_row_s"], sp["per_block_s"], sp["per_token_s"])
    if cal.get("device_kind") == "cpu" and cal.get("cpu_cores"):
        changes["cpu_cores"] = int(cal["cpu_cores"])
    if cal.get("comm"):
        ar, p2p = cal["comm"]["all_reduce"], cal["comm"]["p2p"]
        hop = max(0.0, ar["latency_s"] - p2p["latency_s"]) / 2
        link = LinkProfile(bandwidth=p2p["bytes_per_s"], latency=p2p["latency_s"], hop_latency=hop)
        changes["intra_node"] = changes["inter_node"] = link
    return hw.replace(**changes)


def summary_lines(cal: dict) -> list[str]:
    g, a = cal["gemm"], cal["attention"]
    lines = [f"device: {cal['device_kind']} ({cal['device_name']}), torch {cal['torch']}, {cal['dtype']}, "
             f"{cal['threads']} threads, {cal['seconds']} s",
             f"GEMM: {g['flops_per_s'] / 1e9:,.1f} GFLOP/s, {g['bytes_per_s'] / 1e9:,.2f} GB/s, "
             f"overhead {g['overhead_s'] * 1e6:.1f} us (fit error {math.expm1(g['mean_abs_log_err']):.0%})",
             f"attention: decode ({a.get('decode_kernel', 'SDPA')}) {a['bytes_per_s'] / 1e9:,.2f} GB/s, "
             f"prefill {a['prefill_flops_per_s'] / 1e9:,.1f} GFLOP/s, "
             f"overhead {a['overhead_s'] * 1e6:.1f} us (fit error {math.expm1(a['mean_abs_log_err']):.0%})"]
    if max(g["mean_abs_log_err"], a["mean_abs_log_err"]) > 0.4:
        lines.append("warning: the roofline fits these timings badly; a busy machine (other processes, more "
                     "threads than free cores) is the usual cause -- rerun, or try --threads 1")
    if cal.get("comm"):
        ar, p2p = cal["comm"]["all_reduce"], cal["comm"]["p2p"]
        lines.append(f"comm ({cal['comm_note']}): p2p {p2p['bytes_per_s'] / 1e9:.2f} GB/s + "
                     f"{p2p['latency_s'] * 1e6:.0f} us; all-reduce {ar['bytes_per_s'] / 1e9:.2f} GB/s + "
                     f"{ar['latency_s'] * 1e6:.0f} us")
    else:
        lines.append(f"comm: {cal['comm_note']}")
    if cal.get("engine_error"):
        lines.append(f"engine: not calibrated ({cal['engine_error']})")
    if eng := cal.get("engine"):
        f, h = eng["device_fixed"], eng["host"]
        launch = (f"eager launch {h['launch_layer_s'] * 1e6:.1f} us a layer + {h['launch_step_s'] * 1e6:.1f} "
                  "us a step" if h["launch_overlaps_device"] else "launch: in the device's fixed costs (CPU)")
        lines += [f"engine ({eng['model']}, {eng['seconds']} s): device fixed {f['layer_fixed_s'] * 1e6:.1f} "
                  f"us a layer, {f['step_fixed_s'] * 1e6:.1f} us a step",
                  f"host: {h['step_s'] * 1e6:.1f} us a step + {h['per_seq_s'] * 1e6:.2f} us a sequence + "
                  f"{h['per_kv_token_s'] * 1e9:.2f} ns a cached token "
                  f"(fit error {h['mean_abs_rel_err']:.0%}); {launch}"]
    if cal.get("pool_error"):
        lines.append(f"pool: not calibrated ({cal['pool_error']})")
    if pool := cal.get("pool"):
        lines.append(f"pool ({pool['seconds']} s): worker {pool['worker_call_s'] * 1e6:.0f} us a call + "
                     f"{pool['worker_per_seq_s'] * 1e6:.1f} us a sequence; driver "
                     f"{pool['driver_mb_s'] * 1e6:.0f} us a layer and micro-batch + "
                     f"{pool['driver_pool_mb_s'] * 1e6:.0f} us a layer and pool "
                     f"micro-batch + {pool['driver_route_s'] * 1e6:.0f} us a layer and route + "
                     f"{pool['driver_step_s'] * 1e6:.0f} us a step")
    if r := cal.get("ranks"):
        ar = ", ".join(f"{int(n)} ranks +{v * 1e6:.0f} us" for n, v in r["allreduce_extra_s"])
        steps = ", ".join(f"{int(n)} processes +{v * 1e6:.0f} us" for n, v in r.get("step_extra_s", ()))
        lines.append(f"ranks ({r['seconds']} s): exchange {r['exchange_s'] * 1e6:.0f} us a side, layer and "
                     f"micro-batch; ranks computing at once x{r['concurrent_stretch']:.2f}; all-reduce "
                     f"{ar or 'not measured'}; " + (f"a step of {steps}" if steps else "no step term")
                     + "".join(f"; a {mb}-micro-batch pool step of {int(n)} worker(s) +{a * 1e6:.0f} us a layer "
                               f"+{s * 1e6:.0f} us" for mb, key in ((1, "pool_extra_s"), (2, "pool_mb2_extra_s"))
                               for n, a, s in r.get(key, ()))
                     + "".join(f"; a PP {int(n)} step +{a * 1e6:.0f} us a layer +{s * 1e6:.0f} us"
                               for n, a, s in r.get("pp_extra_s", ())))
    if sp := cal.get("sparse"):
        lines.append(f"sparse decode: {sp['call_s'] * 1e6:.0f} us a call + {sp['per_row_s'] * 1e6:.1f} us a row + "
                     f"{sp['per_block_s'] * 1e9:.0f} ns a summary block + {sp['per_token_s'] * 1e9:.1f} ns a KV "
                     f"token read (fit error {sp['mean_abs_rel_err']:.0%})")
    if cal.get("cpu_cores"):
        lines.append(f"cores shared by the engine's processes: {cal['cpu_cores']}")
    return lines
