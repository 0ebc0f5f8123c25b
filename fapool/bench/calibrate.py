"""The measuring half of `fapool calibrate`: time the engine's GEMMs, decode attention and (CPU)
exchanges here, then short decodes of the real engine (fixed device costs, host work, launches; with
--pool, the pool's and the ranks' overheads); fapool/sim/calibrate.py fits them and writes schema 3.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np

from fapool.config import ModelConfig
from fapool.sim.calibrate import (
    SCHEMA,
    _fit_samples,
    apply_calibration,
    fit_device_fixed,
    fit_gemm_by_m,
    fit_host,
    fit_launch,
    fit_linear,
    fit_pool_terms,
    fit_rank_terms,
    fit_sparse,
    pool_kind,
    rank_strategy,
)
from fapool.sim.cost_model import CostModel, sparse_terms
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HardwareProfile, PoolOverheads, get_hardware

# The small (n, k) and (batch, ctx) points are the tiny engine model's own sizes: they pin the
# fixed cost of a call, so the engine fit's per-layer residual does not count it twice.
QUICK = {
    "gemm_m": [1, 2, 4, 8, 16, 64, 256],
    "gemm_nk": [(256, 256), (512, 512), (2048, 512)],
    # (batch, heads, ctx, head_dim); rows of >= 256 keys take the backend's per-sequence flash path
    "decode": [(1, 4, 32, 64), (1, 4, 256, 64), (4, 4, 128, 64), (4, 4, 512, 64), (8, 4, 256, 64),
               (8, 8, 1024, 64), (8, 8, 2048, 64), (8, 8, 4096, 64)],
    "prefill": [(1, 8, 512, 64)],
    "comm_bytes": [4096, 262144, 2097152],
}
FULL = {
    "gemm_m": [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096],
    "gemm_nk": [(256, 256), (1024, 1024), (4096, 4096), (16384, 4096), (4096, 16384)],
    "decode": [(1, 4, 128, 64), (8, 4, 2048, 64), (32, 4, 2048, 64), (8, 32, 512, 128), (16, 32, 1024, 128),
               (64, 32, 4096, 128), (128, 32, 8192, 128), (8, 32, 32768, 128)],
    "prefill": [(1, 32, 4096, 128), (1, 32, 8192, 128)],
    "comm_bytes": [4096, 1 << 20, 16 << 20, 64 << 20],
}
# Decode points added on a GPU (67 MB to 4.3 GB of KV): the attention table interpolates between
# samples and extrapolates at the largest one's rate, so it needs every decade up to full bandwidth.
GPU_DECODE = [(8, 32, 512, 128), (8, 32, 2048, 128), (32, 32, 2048, 128), (16, 32, 8192, 128),
              (64, 32, 4096, 128), (8, 32, 32768, 128)]
QUICK_CPU = {"layers": (1, 3), "batches": (1, 4, 8), "contexts": (32, 256), "steps": 12, "warmup": 2,
             "repeats": 2}
QUICK_GPU = {"layers": (1, 3), "batches": (1, 8, 32), "contexts": (128, 2048), "steps": 16, "warmup": 4,
             "repeats": 1}
# twin="model" on a CPU: a model-wide layer costs about one step's noise, so three depths spanning
# 7 layers fit the slope by least squares.
QUICK_CPU_MODEL = {**QUICK_CPU, "layers": (1, 4, 8)}
TWINS = ("tiny", "model")
# The pool part (`--pool`, CPU): (attention workers, micro-batches) at two depths, contexts below and
# above the threshold; non-negative least squares on the driver's StepReports (20th percentiles).
QUICK_POOL = {"layers": (4, 12), "pools": ((1, 1), (1, 2), (2, 1)), "batches": (2, 4), "contexts": (16, 80),
              "threshold": 32, "tokens_per_worker": 32, "steps": 8, "warmup": 2}
# The multi-rank part (with --pool, CPU): AFD 1:1 with one and two micro-batches, TP engines (each
# rank count up to cores + 1 that the model's heads allow) and pool engines, the target at two depths.
# A wide span of depths: a layer's exchanges cost about a short step's noise, and past the cores a TP
# layer costs more in a deeper step (docs/simulator.md).
QUICK_RANKS = {"layers": (2, 16), "batch": 4, "context": 64, "steps": 8, "warmup": 2, "repeats": 2,
               "rounds": 2}
# Pool engines, (mode, workers): each mode the engine runs, at 1 and 2 workers, with one micro-batch;
# "-mb2": two micro-batches, whose rest is fitted on its own (fapool.sim.calibrate.pool_kind).
RANK_POOLS = (("shard", 1), ("replicate", 2), ("head", 2), ("shard-mb2", 2), ("head-mb2", 2))
# Operands rotate over copies that together exceed the last-level cache, so every call reads
# them from memory, as the engine's step does.
COLD_BYTES = 256 << 20


def typical(times, cpu: bool) -> float:
    """The 20th percentile (CPU: on a shared machine noise from other processes only adds time)
    or the median (GPU)."""
    return float(np.percentile(times, 20 if cpu else 50))


def _run(fn, reps: int, device) -> float:
    """Seconds per call of `reps` back-to-back calls (CUDA events on a GPU)."""
    import torch

    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def time_op(fn, device, min_time: float = 0.02, max_reps: int = 200) -> float:
    """Seconds per call. GPU: the fastest of 3 event-timed batches. CPU: `typical` of single calls."""
    fn()
    fn()  # warm-up: allocation, kernel selection
    once = max(_run(fn, 1, device), 1e-7)
    reps = int(min(max_reps, max(5, min_time / once)))
    if device.type == "cuda":
        return float(min(_run(fn, max(1, reps // 3), device) for _ in range(3)))
    return typical([_run(fn, 1, device) for _ in range(reps)], cpu=True)


def time_graph(fn, device, target_s: float = 2e-4) -> float:
    """Seconds per call of `fn` replayed in a CUDA graph of ~`target_s` (no host launch cost in the
    device time; fapool.bench.linear's timer); `time_op` on a CPU or for a call that cannot be captured."""
    if device.type != "cuda":
        return time_op(fn, device)
    from fapool.bench.linear import time_graph as graph_median

    once = time_op(fn, device, min_time=0.005, max_reps=20)
    copies = int(min(64, max(1, target_s / max(once, 1e-7))))
    try:
        return float(graph_median(lambda _: fn(), copies))
    except Exception:  # noqa: BLE001 - an op that cannot be captured is timed eagerly
        return once


def _copies(nbytes: float) -> int:
    return int(max(1, min(1024, -(-COLD_BYTES // max(1, int(nbytes))))))


def _cycle(fn_of, items):
    """A no-argument callable that applies `fn_of` to the next of `items` each call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn_of(items[state["i"]])

    return call


def model_linear_shapes(model) -> list[tuple[int, int]]:
    """(n, k) of the linears a decode step of `model` runs (merged q/k/v and gate/up)."""
    q, kv = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    h, f = model.hidden_size, model.intermediate_size
    up = 2 * f if model.gated_mlp else f
    return [(q + 2 * kv, h), (h, q), (up, h), (h, f), (model.vocab_size, h)]


def _gemm_samples(device, dtype, grid) -> list[dict]:
    import torch

    from fapool.layers.cpu_linear import linear_fn

    out = []
    d = dtype.itemsize
    for n, k in grid["gemm_nk"]:  # nn.Linear's layout, [n, k]
        ws = [linear_fn(torch.randn(n, k, device=device, dtype=dtype)) for _ in range(_copies(n * k * d))]
        for m in grid["gemm_m"]:
            a = torch.randn(m, k, device=device, dtype=dtype)
            t = time_graph(_cycle(lambda w, a=a: w(a), ws), device)
            out.append({"m": m, "n": n, "k": k, "flops": 2.0 * m * n * k, "bytes": (m * k + k * n + m * n) * d,
                        "s": t})
        del ws
    return out


def _paged_decode_call(backend, device, dtype, bsz: int, h: int, ctx: int, hd: int, block_size: int = 16):
    """A closure running the engine backend's decode attention over `bsz` x (`ctx` + 1) tokens in a
    paged cache whose blocks are shuffled, as in use."""
    import torch

    from fapool.attention.metadata import AttentionMetadata

    per_seq = -(-(ctx + 1) // block_size)
    num_blocks = bsz * per_seq
    gen = torch.Generator().manual_seed(bsz * 131 + ctx)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(bsz)]
    shape = (num_blocks, block_size, h, hd)
    kv_bytes = 2 * num_blocks * block_size * h * hd * dtype.itemsize
    caches = [
        (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
        for _ in range(_copies(kv_bytes))
    ]
    meta = AttentionMetadata.build(
        query_lens=[1] * bsz,
        query_pos_start=[ctx] * bsz,
        kv_lens=[ctx + 1] * bsz,
        block_tables=tables,
        slot_mapping=[t[ctx // block_size] * block_size + ctx % block_size for t in tables],
        device=device,
    )
    q = torch.randn(bsz, h, hd, device=device, dtype=dtype)
    scale = hd**-0.5
    return _cycle(lambda kv: backend.forward(q, kv[0], kv[1], meta, scale), caches)


def _attention_samples(device, dtype, grid) -> tuple[list[dict], list[dict], str]:
    import torch
    import torch.nn.functional as F

    from fapool.attention.selector import make_backend

    backend = make_backend(None, str(device))
    d = dtype.itemsize
    decode, prefill = [], []
    for bsz, h, ctx, hd in grid["decode"]:
        nbytes = (2.0 * bsz * h * (ctx + 1) * hd + 2.0 * bsz * h * hd) * d
        paged = _paged_decode_call(backend, device, dtype, bsz, h, ctx, hd)
        flops = 4.0 * bsz * h * (ctx + 1) * hd
        decode.append({"batch": bsz, "heads": h, "ctx": ctx + 1, "head_dim": hd, "flops": flops,
                       "bytes": nbytes, "s": time_graph(paged, device)})
        del paged
    for bsz, h, ctx, hd in grid["prefill"]:
        q = torch.randn(bsz, h, ctx, hd, device=device, dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        t = time_graph(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
        prefill.append({"batch": bsz, "heads": h, "ctx": ctx, "head_dim": hd, "s": t,
                        "flops": 4.0 * bsz * h * hd * ctx * (ctx + 1) / 2,
                        "bytes": 4.0 * bsz * h * ctx * hd * d})
    return decode, prefill, f"{backend.name} backend (paged decode)"


# Sparse decode (CPU): (batch, context, budget share of blocks) at the model's head layout, block 16.
SPARSE_GRID = [(b, c, f) for b in (1, 4) for c in (256, 1024, 2048) for f in (0.125, 0.5)]


def _sparse_samples(device, dtype, model: ModelConfig, grid=SPARSE_GRID) -> list[dict]:
    """The engine's sparse backend (fapool.attention.sparse, a uniform budget) over the model's
    heads: one layer's decode call plus its summary update for the new tokens, as a step runs it."""
    import torch

    from fapool.attention.metadata import AttentionMetadata
    from fapool.attention.selector import make_backend
    from fapool.attention.sparse import SparseAttentionBackend

    dense = make_backend(None, str(device))
    hq, hkv, hd, bs = model.num_attention_heads, model.num_key_value_heads, model.head_dim, 16
    out = []
    for bsz, ctx, frac in grid:
        per_seq = -(-(ctx + 1) // bs)
        order = torch.randperm(bsz * per_seq, generator=torch.Generator().manual_seed(ctx + bsz)).tolist()
        tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(bsz)]
        shape = (bsz * per_seq, bs, hkv, hd)
        slots = [t[ctx // bs] * bs + ctx % bs for t in tables]
        meta = AttentionMetadata.build(query_lens=[1] * bsz, query_pos_start=[ctx] * bsz, kv_lens=[ctx + 1] * bsz,
                                       block_tables=tables, slot_mapping=slots, device=device)
        q = torch.randn(bsz, hq, hd, device=device, dtype=dtype)
        new = torch.tensor(slots, device=device)
        copies = []
        for _ in range(_copies(2 * np.prod(shape) * dtype.itemsize)):
            k, v = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
            be = SparseAttentionBackend(dense, [frac] * hkv)
            be.update_summaries(k, torch.arange(k.shape[0] * bs, device=device))
            copies.append((be, k, v))

        def call(c):
            be, k, v = c
            be.update_summaries(k, new)
            return be.forward(q, k, v, meta, hd**-0.5)

        rows, blocks, tokens = sparse_terms(bsz, ctx + 1, frac, hkv, bs)
        out.append({"batch": bsz, "ctx": ctx + 1, "frac": frac, "rows": rows, "blocks": blocks,
                    "tokens": tokens, "s": time_op(_cycle(call, copies), device, min_time=0.2, max_reps=400)})
    return out


def _comm_worker(rank: int, port: int, sizes: list[int], queue) -> None:
    """Time the engine's own exchanges (fapool.worker.comm) between two one-thread ranks: a sum and a
    one-way message, per size."""
    import torch
    import torch.distributed as dist

    from fapool.worker import comm

    torch.set_num_threads(1)
    comm.init_process_group(rank, 2, f"tcp://127.0.0.1:{port}", "gloo", 600)
    group = dist.new_group([0, 1])
    results = []
    for nbytes in sizes:
        x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        for op in ("all_reduce", "p2p"):

            def call(op=op, x=x):
                if op == "all_reduce":
                    comm.wait(comm.all_reduce(x, group), 1 - rank, "sum")
                elif rank == 0:
                    comm.wait(comm.send_tensor(x, 1), 1, "send")
                    comm.wait(comm.recv_tensor(x, 1), 1, "recv")
                else:
                    comm.wait(comm.recv_tensor(x, 0), 0, "recv")
                    comm.wait(comm.send_tensor(x, 0), 0, "send")

            for _ in range(2):
                call()
            times = []
            for _ in range(16):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            el = typical(times, cpu=True)  # a descheduled peer only adds time
            if op == "p2p":
                el /= 2  # a round trip is two one-way messages
            results.append({"op": op, "bytes": x.numel() * 4, "ranks": 2, "s": el})
    comm.destroy_process_group()
    if rank == 0:
        queue.put(results)


def _comm_samples(sizes: list[int], timeout: float = 60.0) -> tuple[list[dict] | None, str]:
    import multiprocessing as mp

    from fapool.worker.comm import free_port

    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return None, "fork start method unavailable"
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_comm_worker, args=(r, port, sizes, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = q.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - report any failure as "not measured"
        res = None
        note = f"exchange timing failed: {exc!r}"
    else:
        note = "the engine's same-host transport (Unix sockets), 2 one-thread processes"
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    return res, note


def calibrate(
    device: str = "auto",
    quick: bool = True,
    collectives: bool = True,
    grid: dict | None = None,
    threads: int | None = None,
    engine: bool = True,
    model=None,
    engine_grid: dict | None = None,
    progress=None,
    checkpoint=None,
    pool: bool | None = None,
    twin: str = "tiny",
) -> dict:
    """Time and fit the kernels (and collectives on a CPU), then unless `engine` is false the
    engine decode of `model`'s tiny twin (or with twin="model" of `model` cut to depth), then
    with `pool` (default: not quick) the CPU pool part. `checkpoint(cal)` gets each partial result."""
    if engine and twin != "tiny":  # checked before minutes of kernel timing, not after
        engine_twin(model, 1, twin)
    import torch

    from fapool.bench.results import device_name

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimInputError("calibrate: --device cuda asked for but torch sees no CUDA device")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda" and quick and grid is None:
        grid = {**QUICK, "decode": QUICK["decode"] + GPU_DECODE}
    grid = grid or (QUICK if quick else FULL)
    if model is not None:  # the target model's own linears join the GEMM grid
        grid = {**grid, "gemm_nk": list(dict.fromkeys([*grid["gemm_nk"], *model_linear_shapes(model)]))}
    t0 = time.perf_counter()
    gemm = _gemm_samples(dev, dtype, grid)
    decode, prefill, decode_kernel = _attention_samples(dev, dtype, grid)
    comm, comm_note = (None, "skipped")
    if collectives and dev.type == "cpu":
        comm, comm_note = _comm_samples(grid["comm_bytes"])
    elif collectives:
        comm_note = "not measured: one GPU here (NCCL needs two ranks)"
    g = _fit_samples(gemm)
    g["by_m"] = fit_gemm_by_m(gemm, g["overhead_s"])
    a = _fit_samples(decode)
    pf = [s["flops"] / max(s["s"] - a["overhead_s"], 1e-9) for s in prefill]
    out = {
        "schema": SCHEMA,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device_kind": dev.type,
        "device_name": device_name(str(dev)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_bytes": dtype.itemsize,
        "gemm": g,
        "attention": {**a, "prefill_flops_per_s": float(max(pf)) if pf else a["flops_per_s"],
                      "decode_kernel": decode_kernel},
        "comm": None,
        "comm_note": comm_note,
        "samples": {"gemm": gemm, "decode": decode, "prefill": prefill, "comm": comm},
        "engine": None,
        "pool": None,
        # The cores this process may run on: the engine's processes (one thread each) share them.
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "seconds": None,
    }
    if comm:
        ar = [s for s in comm if s["op"] == "all_reduce"]
        p2p = [s for s in comm if s["op"] == "p2p"]
        # Ring all-reduce over n ranks moves 2(n-1)/n of the bytes: x for the fit.
        ar_x = [2 * (s["ranks"] - 1) / s["ranks"] * s["bytes"] for s in ar]
        out["comm"] = {"all_reduce": fit_linear(ar_x, [s["s"] for s in ar]),
                       "p2p": fit_linear([s["bytes"] for s in p2p], [s["s"] for s in p2p])}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    cpu = dev.type == "cpu"
    if engine:  # the engine decode, priced by the kernel fits alone
        if twin != "tiny":
            engine_grid = {**(engine_grid or (QUICK_CPU_MODEL if cpu else QUICK_GPU)), "twin": twin}
        hw = apply_calibration(get_hardware("cpu" if cpu else "h100"), out)
        run = lambda: calibrate_engine("cpu" if cpu else "cuda", hw, model, engine_grid, progress)
        _add_section(out, "engine", run, t0, progress, checkpoint, "no host model")
    if (not quick if pool is None else pool) and out["engine"]:
        if not cpu:
            out["pool_note"] = "not measured: the pool calibration runs on CPU only"
            return out
        # The tiny pool engines, priced with zero pool terms and no contention.
        hw = apply_calibration(get_hardware("cpu"), out).replace(pool=PoolOverheads(), cpu_cores=None)
        run = lambda: calibrate_pool(hw, model, None, progress)
        _add_section(out, "pool", run, t0, progress, checkpoint, "no pool terms")
        if model is not None:  # the sparse backend at the target's heads
            out["sparse"] = fit_sparse(_sparse_samples(dev, dtype, model))
        if model is not None:  # TP, AFD and pool engines of the target, priced with contention
            hw = apply_calibration(get_hardware("cpu"), out)
            run = lambda: calibrate_ranks(hw, model, twin, out["cpu_cores"], None, progress)
            _add_section(out, "ranks", run, t0, progress, checkpoint, "no rank terms")
    return out


def _add_section(cal: dict, key: str, run, t0: float, progress, checkpoint, lost: str) -> None:
    """cal[key] = run(); `checkpoint(cal)` first, so the earlier parts survive a crash, and an
    exception is recorded as cal[key + "_error"] rather than losing them; cal["seconds"] since `t0`."""
    if checkpoint:
        checkpoint(cal)
    try:
        cal[key] = run()
    except Exception as exc:  # noqa: BLE001 - keep the rest, say why
        cal[key] = None
        cal[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
        if progress:
            progress(f"warning: the {key} calibration failed ({cal[f'{key}_error']}); {lost}")
    cal["seconds"] = round(time.perf_counter() - t0, 3)


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
    base = {"vocab_size": 1024, "hidden_size": heads * head_dim, "intermediate_size": 2 * heads * head_dim,
            "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "max_position_embeddings": 4096}
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


def calibrate_engine(device: str, hw: HardwareProfile, model: ModelConfig | None = None,
                     grid: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the engine decode and fit the host, fixed-cost and (GPU) launch terms; `hw` holds the kernel
    fits alone."""
    cuda = device.startswith("cuda")
    grid = grid or (QUICK_GPU if cuda else QUICK_CPU)
    depths = tuple(grid["layers"])
    if len(depths) < 2 or any(b <= a for a, b in itertools.pairwise(depths)) or depths[0] < 1:
        raise SimInputError("engine calibration needs two or more depths (>= 1 layer), each larger than "
                            "the last")
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

    cost = CostModel(engine_twin(model, depths[0], twin), hw, include_host=False)
    fixed = fit_device_fixed(samples, cost, depths)
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
    # async_scheduling: the engine's default on CUDA, host work hidden behind the GPU
    host = {**host, **launch, "cuda_graphs": graphs, "launch_overlaps_device": cuda, "async_scheduling": cuda,
            "note": "host = whole engine step - device time (graph replay on GPU; forward on CPU)"}
    name += f" (hidden {engine_twin(model, depths[0], twin).hidden_size}, layers {', '.join(map(str, depths))})"
    return {"model": name, "twin": twin, "device_fixed": fixed, "host": host, "samples": samples,
            "eager_samples": eager, "seconds": round(time.perf_counter() - t0, 3)}


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
    p20 = lambda xs: typical(xs, cpu=True)
    workers = sorted({w for s in rows for w in s.workers})
    worker_s = {str(w): p20([s.workers[w].compute_s if w in s.workers else 0.0 for s in rows])
                for w in workers}
    return {"batch": batch, "context": context, "context_mean": ctx0 + (steps - 1) / 2,
            "driver_busy_s": p20([s.dense_s + s.local_attention_s for s in rows]),
            "driver_wait_s": p20([s.wait_s for s in rows]), "total_s": p20([s.total_s for s in rows]),
            "worker_attention_s": worker_s}


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
    configs += [("pp", 2, rank_strategy("pp", 2, 1).engine_args())]
    b, ctx, steps, warmup = grid["batch"], grid["context"], grid["steps"], grid["warmup"]
    blocks = kv_blocks(b, ctx + steps + warmup + 24)
    configs += [(kind, n, {**rank_strategy(kind, n, 1).engine_args(), "micro_batches": pool_kind(kind)[1],
                           "worker_kv_blocks": blocks})
                for kind, n in grid.get("pools", RANK_POOLS)
                if pool_kind(kind)[0] != "head" or n <= m.num_key_value_heads]
    samples = []
    # A single process of each depth is timed in turn with every multi-rank engine: the fit reads each
    # rank engine's step against it, so the host's speed while that engine ran (shared memory bandwidth
    # moves it by tens of percent on a shared VM) does not land in the rank terms.
    singles = [engine_twin(model, d, twin) for d in grid["layers"]]
    with engines_of(singles, "cpu", b, blocks) as single_engines:
        single_of = dict(zip(grid["layers"], single_engines, strict=True))
        for kind, n, args in configs:
            # One multi-rank engine a process: the depths alternate, `rounds` times each, so drifting load
            # falls on both alike.
            times: dict[int, list[float]] = {d: [] for d in grid["layers"]}
            beside: dict[int, list[float]] = {d: [] for d in grid["layers"]}
            ctx_mean = []
            for _, d in itertools.product(range(grid["rounds"]), grid["layers"]):
                with engines_of([engine_twin(model, d, twin)], "cpu", b, blocks, **args) as (engine,):
                    for _ in range(grid["repeats"]):
                        with decoding(engine, b, ctx, steps + warmup + 8, warmup) as reqs:
                            ctx_mean.append(reqs[0].num_computed_tokens + (steps - 1) / 2)
                            times[d] += step_times(engine, steps)
                        with decoding(single_of[d], b, ctx, steps + warmup + 8, warmup):
                            beside[d] += step_times(single_of[d], steps)
            # The median, not the 20th percentile: the ranks' wake-ups spread a multi-process step's times
            # (median/p20 1.05-1.16 against the single process's 1.04), and the median is what is predicted.
            for d in grid["layers"]:
                row = {"kind": kind, "n": n, "layers": d, "batch": b,
                       "context": round(float(np.mean(ctx_mean))), "step_s": float(np.median(times[d])),
                       "single_s": float(np.median(beside[d]))}
                samples.append(row)
                if progress:
                    progress(f"ranks {kind} {n} L={d}: step {row['step_s'] * 1e3:.2f} ms, single process "
                             f"beside it {row['single_s'] * 1e3:.2f} ms")
    fit = fit_rank_terms(samples, CostModel(engine_twin(model, 1, twin), hw))
    return {"model": f"{twin} twin, layers {grid['layers']}", **fit, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 3)}
