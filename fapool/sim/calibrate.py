"""`fapool calibrate`: time the engine's GEMMs, decode attention and (CPU) exchanges here, fit the
roofline's effective rates, and write them as JSON (schema 3); engine_calibrate.py adds the engine's
fixed, host and pool terms. Method: docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fapool.sim.engine_calibrate import typical
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import (HardwareProfile, HostProfile, LinkProfile, PoolOverheads, RankOverheads,
                                 get_hardware)

SCHEMA = 3  # the one schema read; older files in benchmarks/results were converted once
REQUIRED = ("gemm", "attention", "engine", "pool", "cpu_cores")  # engine / pool may be null
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
    cols = ([s[k] for s in samples] for k in ("flops", "bytes", "s"))
    return fit_roofline(*cols, overheads)


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


# Operands rotate over copies that together exceed the last-level cache, so every call reads
# them from memory, as the engine's step does.
COLD_BYTES = 256 << 20


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
    from fapool.sim import engine_calibrate as ec

    if engine and twin != "tiny":  # checked before minutes of kernel timing, not after
        ec.engine_twin(model, 1, twin)
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
            engine_grid = {**(engine_grid or (ec.QUICK_CPU_MODEL if cpu else ec.QUICK_GPU)), "twin": twin}
        hw = apply_calibration(get_hardware("cpu" if cpu else "h100"), out)
        run = lambda: ec.calibrate_engine("cpu" if cpu else "cuda", hw, model, engine_grid, progress)
        _add_section(out, "engine", run, t0, progress, checkpoint, "no host model")
    if (not quick if pool is None else pool) and out["engine"]:
        if not cpu:
            out["pool_note"] = "not measured: the pool calibration runs on CPU only"
            return out
        # The tiny pool engines, priced with zero pool terms and no contention.
        hw = apply_calibration(get_hardware("cpu"), out).replace(pool=PoolOverheads(), cpu_cores=None)
        run = lambda: ec.calibrate_pool(hw, model, None, progress)
        _add_section(out, "pool", run, t0, progress, checkpoint, "no pool terms")
        if model is not None:  # TP, AFD and pool engines of the target, priced with contention
            hw = apply_calibration(get_hardware("cpu"), out)
            run = lambda: ec.calibrate_ranks(hw, model, twin, out["cpu_cores"], None, progress)
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
        raise SimInputError(
            f"{path}: not a fapool calibration of schema {SCHEMA}"
            + (f" (missing {', '.join(missing)})" if missing else f" (schema {cal.get('schema')!r})")
            + "; rerun `fapool calibrate`"
        )
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
    return {f.name: type(f.default)(section[f.name]) for f in dataclasses.fields(cls)}


def apply_calibration(hw: HardwareProfile, cal: dict) -> HardwareProfile:
    """The profile with fitted rates in place of the preset's (memory and, unless measured,
    the interconnect stay the preset's), and the engine's fixed costs, host and pool terms."""
    g, a = cal["gemm"], cal["attention"]
    changes = {
        "gemm_flops": g["flops_per_s"],
        "gemm_bandwidth": g["bytes_per_s"],
        "kernel_overhead": g["overhead_s"],
        "attn_by_bytes": attn_table(cal.get("samples", {}).get("decode") or [])
        if a.get("decode_kernel") else (),
        "gemm_by_m": tuple((int(r["m"]), float(r["flops_per_s"]), float(r["bytes_per_s"]))
                           for r in g.get("by_m", [])),
        "attn_flops": a.get("prefill_flops_per_s", a["flops_per_s"]),
        "attn_bandwidth": a["bytes_per_s"],
        "attn_overhead": a["overhead_s"],
        "dtype_bytes": int(cal.get("dtype_bytes", hw.dtype_bytes)),
        "source": f"calibration {cal.get('_path', '')} ({cal.get('device_name', '?')})",
    }
    eng = cal.get("engine")
    if eng:
        changes["layer_fixed_s"] = eng["device_fixed"]["layer_fixed_s"]
        changes["step_fixed_s"] = eng["device_fixed"]["step_fixed_s"]
        changes["host"] = HostProfile(**_fields(HostProfile, eng["host"]))
    if cal["pool"]:
        changes["pool"] = PoolOverheads(**_fields(PoolOverheads, cal["pool"]))
    if cal.get("ranks"):  # absent from calibrations made before the rank terms
        r = cal["ranks"]
        pairs = lambda key: tuple((int(n), *map(float, v)) for n, *v in r.get(key, ()))  # noqa: E731
        changes["ranks"] = RankOverheads(float(r["exchange_s"]), float(r["concurrent_stretch"]),
                                         pairs("allreduce_extra_s"), pairs("step_extra_s"), pairs("pool_extra_s"))
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
    lines = [
        (f"device: {cal['device_kind']} ({cal['device_name']}), torch {cal['torch']}, {cal['dtype']}, "
        f"{cal['threads']} threads, {cal['seconds']} s"),
        (f"GEMM: {g['flops_per_s'] / 1e9:,.1f} GFLOP/s, {g['bytes_per_s'] / 1e9:,.2f} GB/s, "
        f"overhead {g['overhead_s'] * 1e6:.1f} us (fit error {math.expm1(g['mean_abs_log_err']):.0%})"),
        (f"attention: decode ({a.get('decode_kernel', 'SDPA')}) {a['bytes_per_s'] / 1e9:,.2f} GB/s, prefill "
        f"{a['prefill_flops_per_s'] / 1e9:,.1f} GFLOP/s, overhead {a['overhead_s'] * 1e6:.1f} us "
        f"(fit error {math.expm1(a['mean_abs_log_err']):.0%})"),
    ]
    if max(g["mean_abs_log_err"], a["mean_abs_log_err"]) > 0.4:
        lines.append("warning: the roofline fits these timings badly; a busy machine (other processes, more "
                     "threads than free cores) is the usual cause -- rerun, or try --threads 1")
    if cal.get("comm"):
        ar, p2p = cal["comm"]["all_reduce"], cal["comm"]["p2p"]
        lines.append(
            f"comm ({cal['comm_note']}): p2p {p2p['bytes_per_s'] / 1e9:.2f} GB/s + "
            f"{p2p['latency_s'] * 1e6:.0f} us; all-reduce {ar['bytes_per_s'] / 1e9:.2f} GB/s + "
            f"{ar['latency_s'] * 1e6:.0f} us"
        )
    else:
        lines.append(f"comm: {cal['comm_note']}")
    if cal.get("engine_error"):
        lines.append(f"engine: not calibrated ({cal['engine_error']})")
    if eng := cal.get("engine"):
        f, h = eng["device_fixed"], eng["host"]
        launch = "launch: in the device's fixed costs (CPU)"
        if h["launch_overlaps_device"]:
            launch = (f"eager launch {h['launch_layer_s'] * 1e6:.1f} us a layer + "
                      f"{h['launch_step_s'] * 1e6:.1f} us a step")
        lines += [
            (f"engine ({eng['model']}, {eng['seconds']} s): device fixed {f['layer_fixed_s'] * 1e6:.1f} us a "
            f"layer, {f['step_fixed_s'] * 1e6:.1f} us a step"),
            (f"host: {h['step_s'] * 1e6:.1f} us a step + {h['per_seq_s'] * 1e6:.2f} us a sequence + "
            f"{h['per_kv_token_s'] * 1e9:.2f} ns a cached token "
            f"(fit error {h['mean_abs_rel_err']:.0%}); {launch}"),
        ]
    if cal.get("pool_error"):
        lines.append(f"pool: not calibrated ({cal['pool_error']})")
    if pool := cal.get("pool"):
        lines.append(
            f"pool ({pool['seconds']} s): worker {pool['worker_call_s'] * 1e6:.0f} us a call + "
            f"{pool['worker_per_seq_s'] * 1e6:.1f} us a sequence; driver {pool['driver_mb_s'] * 1e6:.0f} us a "
            f"layer and micro-batch + {pool['driver_pool_mb_s'] * 1e6:.0f} us a layer and pool micro-batch + "
            f"{pool['driver_route_s'] * 1e6:.0f} us a layer and route + "
            f"{pool['driver_step_s'] * 1e6:.0f} us a step"
        )
    if r := cal.get("ranks"):
        ar = ", ".join(f"{int(n)} ranks +{v * 1e6:.0f} us" for n, v in r["allreduce_extra_s"])
        steps = ", ".join(f"{int(n)} processes +{v * 1e6:.0f} us" for n, v in r.get("step_extra_s", ()))
        lines.append(f"ranks ({r['seconds']} s): exchange {r['exchange_s'] * 1e6:.0f} us a side, layer and "
                     f"micro-batch; ranks computing at once x{r['concurrent_stretch']:.2f}; all-reduce "
                     f"{ar or 'not measured'}; " + (f"a step of {steps}" if steps else "no step term")
                     + "".join(f"; a 1-micro-batch pool step of {int(n)} worker(s) +{a * 1e6:.0f} us a layer "
                               f"+{s * 1e6:.0f} us" for n, a, s in r.get("pool_extra_s", ())))
    if cal.get("cpu_cores"):
        lines.append(f"cores shared by the engine's processes: {cal['cpu_cores']}")
    return lines
