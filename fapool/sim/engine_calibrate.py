"""The engine parts of `fapool calibrate`: a short decode of the real engine at two or more depths fits
what kernel timings cannot see (fixed device costs, host work, launches; with --pool, PoolOverheads).
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from fapool.config import ModelConfig
from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HardwareProfile

def typical(times, cpu: bool) -> float:
    """The 20th percentile (CPU: on a shared machine noise from other processes only adds time)
    or the median (GPU)."""
    return float(np.percentile(times, 20 if cpu else 50))


QUICK_CPU = {"layers": (1, 3), "batches": (1, 4, 8), "contexts": (32, 256), "steps": 12, "warmup": 2,
             "repeats": 2}
QUICK_GPU = {"layers": (1, 3), "batches": (1, 8, 32), "contexts": (128, 2048), "steps": 16, "warmup": 4,
             "repeats": 1}
# twin="model" on a CPU: a model-wide layer costs about one step's noise, so three depths spanning
# 7 layers fit the slope by least squares.
QUICK_CPU_MODEL = {**QUICK_CPU, "layers": (1, 4, 8)}
HOST_TERMS = ("step_s", "per_seq_s", "per_kv_token_s")
TWINS = ("tiny", "model")


def engine_twin(model: ModelConfig | None, num_layers: int, twin: str = "tiny") -> ModelConfig:
    """The model the engine calibration runs at `num_layers` layers: tiny_twin, or the target cut to depth."""
    if twin not in TWINS:
        raise SimInputError(f"engine twin must be one of {TWINS}, got {twin!r}")
    if twin == "model":
        if model is None:
            raise SimInputError("engine twin 'model' needs the target model's config")
        return model.replace(num_hidden_layers=num_layers)
    return tiny_twin(model, num_layers)


def tiny_twin(model: ModelConfig | None, num_layers: int) -> ModelConfig:
    """A small model with the target's architecture flags (default: a gated Llama)."""
    heads, head_dim = 4, 64
    kv_heads = heads
    if model is not None:
        ratio = max(1, model.num_attention_heads // model.num_key_value_heads)
        kv_heads = max(1, heads // min(ratio, heads))
    base = dict(vocab_size=1024, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, max_position_embeddings=4096)
    if model is None:
        return ModelConfig(architecture="llama", **base)
    return model.replace(**base, rope_scaling=None, sliding_window=None, bos_token_id=None, eos_token_ids=())


def kv_blocks(batch: int, tokens: int) -> int:
    """16-token KV blocks for `batch` sequences of up to `tokens` tokens each, with a margin."""
    return batch * (-(-tokens // 16) + 1) + 8


@contextmanager
def engines_of(models: Sequence[ModelConfig], device: str, max_batch: int, num_blocks: int,
               **extra) -> Iterator[list]:
    """An engine over each of `models`, random weights and an explicit KV size (`extra`: more
    EngineArgs); shut down and freed on exit."""
    import torch

    from fapool.attention.selector import make_backend
    from fapool.engine.arg_utils import EngineArgs
    from fapool.engine.llm_engine import LLMEngine
    from fapool.models.registry import build_model
    from fapool.worker.model_runner import DTYPES

    engines = []
    try:
        for mc in models:
            # No prefix caching (random prompts never hit); synchronous steps, so the host's serial
            # work is what is measured (the cost model overlaps it where the engine runs asynchronously).
            config = EngineArgs(device=device, num_kv_blocks=num_blocks, max_num_seqs=max_batch,
                                max_num_batched_tokens=8192, enable_prefix_caching=False,
                                async_scheduling=False, **extra).create_engine_config(mc)
            backend = make_backend(config.attention_backend, config.device)
            model = build_model(mc, backend, DTYPES[config.dtype], config.device)
            model.init_random_weights(config.seed)
            engines.append(LLMEngine(config, model.eval(), backend))
        yield engines
    finally:
        for engine in engines:
            engine.shutdown()
        engines.clear()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


@contextmanager
def decoding(engine, batch: int, context: int, max_tokens: int, warmup: int) -> Iterator[list]:
    """`batch` seeded random prompts of `context` tokens stepped past their first tokens and `warmup`
    more steps; yields the requests, aborted on exit."""
    import torch

    from fapool.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    prompts = torch.randint(0, engine.config.model.vocab_size, (batch, context), generator=gen).tolist()
    ids = [engine.add_request(p, params) for p in prompts]
    try:
        reqs = [engine.groups[i][0] for i in ids]
        while any(not r.output_token_ids for r in reqs):
            engine.step()
        for _ in range(warmup):
            engine.step()
        yield reqs
    finally:
        for rid in ids:
            engine.abort_request(rid)


def _timed(fn, times: list[float], sync=lambda: None):
    """`fn`, appending each call's seconds (up to `sync()` returning) to `times`."""

    def call(out):
        t = time.perf_counter()
        res = fn(out)
        sync()
        times.append(time.perf_counter() - t)
        return res

    return call


def step_times(engine, steps: int) -> list[float]:
    """Seconds of each of `steps` engine steps."""
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t)
    return out


def measure_decode(engine, batch: int, context: int, steps: int, warmup: int) -> dict:
    """Typical whole-step, execute, prepare and device seconds of `steps` decode steps."""
    import torch

    cuda = engine.executor.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # Early requests decode while later ones are still in prefill: leave room for those tokens.
    prefill_steps = -(-batch * context // engine.config.scheduler.max_num_batched_tokens) + 1
    with decoding(engine, batch, context, prefill_steps + steps + warmup + 4, warmup) as reqs:
        runner = engine.executor.runner
        exec_t: list[float] = []
        prep_t: list[float] = []
        runner.execute, runner.prepare = _timed(runner.execute, exec_t, sync), _timed(runner.prepare, prep_t)
        try:
            step_t = step_times(engine, steps)
        finally:
            del runner.execute, runner.prepare
        step_s, exec_s = typical(step_t, not cuda), typical(exec_t, not cuda)
        prep_s = typical(prep_t, not cuda) if prep_t else 0.0
        graphs = runner.decode_graphs if runner.use_cuda_graphs else None
        if graphs is not None and graphs.last_key is not None:
            device_s, mode = graphs.time_replay(*graphs.last_key) / 1e3, "graph"
        else:
            device_s, mode = exec_s - prep_s, "eager"
        if not all(len(r.output_token_ids) > 0 for r in reqs) or any(r.finished for r in reqs):
            raise RuntimeError("a calibration request finished inside the timed window")
    return {"batch": batch, "context": context, "mode": mode, "step_s": step_s, "execute_s": exec_s,
            "prepare_s": prep_s, "device_s": device_s, "step_median_s": typical(step_t, cpu=False),
            "kv_tokens": batch * (context + warmup + 1 + steps / 2)}


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
    pred = x @ c
    err = float(np.mean(np.abs(pred - y) / y))
    return {**{name: float(v) for name, v in zip(HOST_TERMS, c)}, "mean_abs_rel_err": err}


def fit_launch(layers: Sequence[int], forward_s: Sequence[float]) -> dict:
    """Eager forward seconds ~ launch_step_s + launch_layer_s * layers (non-negative)."""
    layers_a, t = np.asarray(layers, dtype=np.float64), np.asarray(forward_s, dtype=np.float64)
    c = fit_nonneg(np.stack([np.ones_like(layers_a), layers_a], axis=1), t)
    return {"launch_step_s": float(c[0]), "launch_layer_s": float(c[1])}


def calibrate_engine(device: str, hw: HardwareProfile, model: ModelConfig | None = None,
                     grid: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the engine decode and fit the host, fixed-cost and (GPU) launch terms; `hw` holds the kernel
    fits alone."""
    cuda = device.startswith("cuda")
    grid = grid or (QUICK_GPU if cuda else QUICK_CPU)
    depths = tuple(grid["layers"])
    if len(depths) < 2 or any(b <= a for a, b in zip(depths, depths[1:])) or depths[0] < 1:
        raise SimInputError("engine calibration needs two or more depths (>= 1 layer), each larger than "
                            "the last")
    lo = depths[0]
    max_b = max(grid["batches"])
    blocks = kv_blocks(max_b, max(grid["contexts"]) + grid["steps"] + grid["warmup"] + 16)
    t0 = time.perf_counter()
    twin = grid.get("twin", "tiny")
    samples: list[dict] = []
    eager: list[dict] = []
    with engines_of([engine_twin(model, d, twin) for d in depths], device, max_b, blocks) as built:
        engines = dict(zip(depths, built))
        for engine in built:
            measure_decode(engine, 2, 32, 3, 1)  # compiles kernels, captures the first graph
        # Depths alternate at each point, repeated (CPU) keeping the fastest: load drifts.
        for batch, context in itertools.product(grid["batches"], grid["contexts"]):
            for depth, engine in engines.items():
                reps = [measure_decode(engine, batch, context, grid["steps"], grid["warmup"])
                        for _ in range(grid.get("repeats", 1))]
                row = min(reps, key=lambda r: r["step_s"])
                samples.append({"layers": depth, **row})
                if progress:
                    progress(f"engine L={depth} B={batch} ctx={context}: step {row['step_s'] * 1e3:.3f} ms, "
                             f"device {row['device_s'] * 1e3:.3f} ms ({row['mode']})")
        if cuda:
            b, c = min(grid["batches"]), min(grid["contexts"])
            for depth, engine in engines.items():
                if not engine.executor.runner.use_cuda_graphs:
                    continue
                engine.executor.runner.use_cuda_graphs = False
                engine.executor.runner.decode_graphs = None
                row = measure_decode(engine, b, c, grid["steps"], grid["warmup"])
                eager.append({"layers": depth, **row})

    # Device: the slope over depth, minus what the rooflines already price.
    layer_res, step_res = [], []
    by_point = {}
    for s in samples:
        by_point.setdefault((s["batch"], s["context"]), {})[s["layers"]] = s
    cost = CostModel(engine_twin(model, lo, twin), hw, include_host=False)
    for (batch, _), pair in sorted(by_point.items()):
        kv = pair[lo]["kv_tokens"]
        dense_c, _ = cost.dense_layer(batch)
        modelled_layer = dense_c + float(cost.decode_attention(kv, batch))
        # Device time over depth by least squares (with two depths: the line through both).
        slope, intercept = np.polyfit(depths, [pair[d]["device_s"] for d in depths], 1)
        layer_res.append(float(slope) - modelled_layer)
        # The intercept of device time over depth, less the modelled LM head.
        step_res.append(float(intercept) - float(cost.lm_head(batch)))
    kvs = [pair[lo]["kv_tokens"] for _, pair in sorted(by_point.items())]
    line = fit_nonneg(np.stack([np.ones(len(kvs)), kvs], axis=1), np.asarray(layer_res))
    layer_fixed = float(line[0])
    step_fixed = max(0.0, float(np.median(step_res)))  # the intercept over depth, per point

    host = fit_host(
        [s["batch"] for s in samples],
        [s["kv_tokens"] for s in samples],
        [s["step_s"] - s["device_s"] for s in samples],
    )
    graphs = bool(samples) and samples[0]["mode"] == "graph"
    if eager:
        launch = fit_launch([e["layers"] for e in eager], [e["execute_s"] - e["prepare_s"] for e in eager])
    else:
        launch = {"launch_step_s": 0.0, "launch_layer_s": 0.0}
    name = ("tiny twin of " if twin == "tiny" else "the target cut to depth, ") + (
        model.architecture if model else "llama")
    fixed = {"layer_fixed_s": layer_fixed, "step_fixed_s": step_fixed,
             "layer_residuals_s": list(map(float, layer_res)), "layer_residual_per_kv_token_s": float(line[1]),
             "step_residuals_s": list(map(float, step_res))}
    # async_scheduling: the engine's default on CUDA, host work hidden behind the GPU
    host = {**host, **launch, "cuda_graphs": graphs, "launch_overlaps_device": cuda, "async_scheduling": cuda,
            "note": "host = whole engine step - device time (graph replay on GPU; forward on CPU)"}
    name += f" (hidden {engine_twin(model, lo, twin).hidden_size}, layers {', '.join(map(str, depths))})"
    return {"model": name, "twin": twin, "device_fixed": fixed, "host": host, "samples": samples,
            "eager_samples": eager, "seconds": round(time.perf_counter() - t0, 3)}


# The pool part (`--pool`, CPU): (attention workers, micro-batches) at two depths, contexts below and
# above the threshold; non-negative least squares on the driver's StepReports (20th percentiles).
QUICK_POOL = {"layers": (4, 12), "pools": ((1, 1), (1, 2), (2, 1)), "batches": (2, 4), "contexts": (16, 80),
              "threshold": 32, "tokens_per_worker": 32, "steps": 8, "warmup": 2}
WORKER_TERMS = ("worker_call_s", "worker_per_seq_s")
DRIVER_TERMS = ("driver_mb_s", "driver_pool_mb_s", "driver_route_s", "driver_step_s")


def measure_pool_decode(engine, batch: int, context: int, steps: int, warmup: int) -> dict:
    """20th percentiles of `steps` decode steps' StepReports on a pool engine (driver busy and wait, each
    worker's attention) and the mean context."""
    with decoding(engine, batch, context, steps + warmup + 8, warmup) as reqs:
        ctx0 = reqs[0].num_computed_tokens
        stats = engine.executor.reports
        stats.clear()
        for _ in range(steps):
            engine.step()
        rows = list(stats)
    p20 = lambda xs: typical(xs, cpu=True)  # noqa: E731
    workers = sorted({w for s in rows for w in s.workers})
    worker_s = {str(w): p20([s.workers[w].compute_s if w in s.workers else 0.0 for s in rows])
                for w in workers}
    return {"batch": batch, "context": context, "context_mean": ctx0 + (steps - 1) / 2,
            "driver_busy_s": p20([s.dense_s + s.local_attention_s for s in rows]),
            "driver_wait_s": p20([s.wait_s for s in rows]), "total_s": p20([s.total_s for s in rows]),
            "worker_attention_s": worker_s}


def _modelled(cost, sample: dict):
    """(driver busy, per-worker busy, calls, seqs, routes, pool micro-batches, micro-batches) of a
    sample priced with zero pool terms and no contention."""
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


def calibrate_pool(hw: HardwareProfile, model: ModelConfig | None = None, grid: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Run the tiny pool engines on the CPU and fit the pool terms; `hw` (zero pool terms) prices the rest."""
    grid = grid or QUICK_POOL
    t0 = time.perf_counter()
    max_b, max_ctx = max(grid["batches"]), max(grid["contexts"])
    blocks = kv_blocks(max_b, max_ctx + grid["steps"] + grid["warmup"] + 16)
    samples: list[dict] = []
    for depth, (workers, n_mb) in itertools.product(grid["layers"], grid["pools"]):
        pool = {"attention_workers": workers, "micro_batches": n_mb, "pool_threshold": grid["threshold"],
                "tokens_per_pool_worker": grid["tokens_per_worker"], "pool_mode": "shard",
                "worker_kv_blocks": blocks}
        with engines_of([tiny_twin(model, depth)], "cpu", max_b, blocks, **pool) as (engine,):
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
    cost = CostModel(tiny_twin(model, grid["layers"][0]), hw)
    fit = fit_pool_terms(samples, cost)
    return {"model": f"tiny twin, layers {grid['layers']}, (workers, micro-batches) {grid['pools']}", **fit,
            "samples": samples, "seconds": round(time.perf_counter() - t0, 3)}


# The multi-rank part (with --pool, CPU): AFD 1:1 with one and two micro-batches, TP engines (each
# rank count up to cores + 1 that the model's heads allow) and pool engines, the target at two depths.
# A wide span of depths: a layer's exchanges cost about a short step's noise, and past the cores a TP
# layer costs more in a deeper step (docs/simulator.md).
QUICK_RANKS = {"layers": (2, 16), "batch": 4, "context": 64, "steps": 8, "warmup": 2, "repeats": 2,
               "rounds": 2}
# Pool engines of one micro-batch, (mode, workers): each mode the engine runs, at 1 and 2 workers.
RANK_POOLS = (("shard", 1), ("replicate", 2), ("head", 2))
POOL_MODES = ("shard", "replicate", "head")


def rank_strategy(kind: str, n: int, batch: int):
    """The simulator's strategy for a calibration engine: ("tp", ranks), ("afd", micro-batches) or
    (a pool mode, workers) with one micro-batch, the pool holding the KV past 32 tokens."""
    from fapool.sim.strategies import AFD, FAPool, StaticTPPP

    if kind == "tp":
        return StaticTPPP(tp=n, pp=1, max_batch=batch)
    if kind in POOL_MODES:
        return FAPool(base_tp=1, pool_size=n, threshold=32, tokens_per_worker=32, mode=kind, overlap=False,
                      max_batch=batch)
    return AFD(r=1, f_tp=1, max_batch_per_attn=batch, overlap=n > 1)


def fit_rank_terms(samples: list[dict], cost) -> dict:
    """RankOverheads from samples {kind, n, layers, batch, context, step_s}; `cost` has no rank terms.
    In turn, each from the slope over depth of (measured - modelled) step: AFD with one micro-batch
    (a serial chain: two exchanges a layer) gives exchange_s; AFD with two (both sides compute at once)
    concurrent_stretch; TP at n ranks its two all-reduces a layer; the intercepts a step's extra by
    processes; a pool engine's slope and intercept, averaged over its modes, pool_extra_s by workers."""
    from dataclasses import replace

    from fapool.sim.hardware import RankOverheads
    from fapool.sim.validate import predict_step

    def line(kind: str, n: int, ranks: RankOverheads) -> tuple[float, float]:
        rows = [s for s in samples if (s["kind"], s["n"]) == (kind, n)]
        if len({s["layers"] for s in rows}) < 2:
            raise SimInputError(f"the rank fit needs {kind} {n} at two depths")
        res = []
        for s in rows:
            c = CostModel(cost.model.replace(num_hidden_layers=s["layers"]), cost.hw.replace(ranks=ranks))
            res.append(s["step_s"] - predict_step(c, rank_strategy(kind, n, s["batch"]), s["batch"],
                                                  s["context"]).duration)
        slope, intercept = np.polyfit([s["layers"] for s in rows], res, 1)
        return float(slope), float(intercept)

    slope = lambda *a: line(*a)[0]  # noqa: E731
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
    by_workers: dict[int, list[tuple[float, float]]] = {}  # a pool step's whole rest: slope and intercept
    for (kind, n), fit in fits.items():
        if kind in POOL_MODES:
            by_workers.setdefault(n, []).append(fit)
        else:
            by_procs.setdefault(n if kind == "tp" else 2, []).append(fit[1])
    pool = [[n, *(max(0.0, float(v)) for v in np.mean(f, axis=0))] for n, f in sorted(by_workers.items())]
    return {"exchange_s": ranks.exchange_s, "concurrent_stretch": ranks.concurrent_stretch,
            "allreduce_extra_s": [list(e) for e in ranks.allreduce_extra_s],
            "step_extra_s": [[p, max(0.0, float(np.mean(v)))] for p, v in sorted(by_procs.items())],
            "pool_extra_s": pool,
            "layer_residuals_s": {f"{k}{n}": v[0] for (k, n), v in fits.items()}}


def calibrate_ranks(hw: HardwareProfile, model: ModelConfig, twin: str, cores: int, grid: dict | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Run the multi-rank engines on the CPU and fit RankOverheads; `hw` (no rank terms) prices the rest."""
    grid = grid or QUICK_RANKS
    t0 = time.perf_counter()
    m = engine_twin(model, 1, twin)
    tps = [n for n in range(2, cores + 2) if m.num_key_value_heads % n == 0 == m.num_attention_heads % n]
    # The engine runs what the simulator prices: each strategy's own engine_args.
    configs = [("afd", mb, {**rank_strategy("afd", mb, 1).engine_args(), "micro_batches": mb})
               for mb in (1, 2)]
    configs += [("tp", n, rank_strategy("tp", n, 1).engine_args()) for n in tps]
    b, ctx, steps, warmup = grid["batch"], grid["context"], grid["steps"], grid["warmup"]
    blocks = kv_blocks(b, ctx + steps + warmup + 24)
    configs += [(mode, n, {**rank_strategy(mode, n, 1).engine_args(), "micro_batches": 1,
                           "worker_kv_blocks": blocks})
                for mode, n in grid.get("pools", RANK_POOLS) if mode != "head" or n <= m.num_key_value_heads]
    samples = []
    for kind, n, args in configs:
        # One multi-rank engine a process: the depths alternate, `rounds` times each, so drifting load
        # falls on both alike.
        times: dict[int, list[float]] = {d: [] for d in grid["layers"]}
        ctx_mean = []
        for _, d in itertools.product(range(grid["rounds"]), grid["layers"]):
            with engines_of([engine_twin(model, d, twin)], "cpu", b, blocks, **args) as (engine,):
                for _ in range(grid["repeats"]):
                    with decoding(engine, b, ctx, steps + warmup + 8, warmup) as reqs:
                        ctx_mean.append(reqs[0].num_computed_tokens + (steps - 1) / 2)
                        times[d] += step_times(engine, steps)
        # The median, not the 20th percentile: the ranks' wake-ups spread a multi-process step's times
        # (median/p20 1.05-1.16 against the single process's 1.04), and the median is what is predicted.
        for d in grid["layers"]:
            row = {"kind": kind, "n": n, "layers": d, "batch": b, "context": round(float(np.mean(ctx_mean))),
                   "step_s": float(np.median(times[d]))}
            samples.append(row)
            if progress:
                progress(f"ranks {kind} {n} L={d}: step {row['step_s'] * 1e3:.2f} ms")
    fit = fit_rank_terms(samples, CostModel(engine_twin(model, 1, twin), hw))
    return {"model": f"{twin} twin, layers {grid['layers']}", **fit, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 3)}
