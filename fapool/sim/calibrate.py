"""`fapool calibrate`: time real torch GEMMs, attention and (gloo) collectives on the current
device, fit the roofline's effective rates, and write them as JSON for the cost model.

What is timed:
  GEMM       torch.matmul [m, k] @ [k, n] over a grid of m (tokens) and (n, k)
  attention  torch SDPA, decode (one query per sequence over L cached tokens) and one causal
             prefill; decode fits the bandwidth, prefill the FLOP rate
  comm       all_reduce and send/recv between two gloo processes (forked, FileStore, no
             ports), CPU only; on a GPU with one device there is nothing to time

Fit: time = overhead + max(flops / F, bytes / B), choosing overhead, F, B to minimise the mean
absolute log error over the samples. The JSON also keeps every sample and the fit error.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HardwareProfile, LinkProfile

SCHEMA = 1
QUICK = {
    "gemm_m": [1, 8, 64, 256],
    "gemm_nk": [(512, 512), (2048, 512)],
    "decode": [(4, 8, 256, 64), (4, 8, 2048, 64), (16, 8, 2048, 64)],  # (batch, heads, ctx, head_dim)
    "prefill": [(1, 8, 512, 64)],
    "comm_bytes": [4096, 262144, 2097152],
}
FULL = {
    "gemm_m": [1, 16, 64, 256, 1024, 4096],
    "gemm_nk": [(4096, 4096), (16384, 4096), (4096, 16384)],
    "decode": [(16, 32, 1024, 128), (64, 32, 4096, 128), (128, 32, 8192, 128), (8, 32, 32768, 128)],
    "prefill": [(1, 32, 4096, 128), (1, 32, 8192, 128)],
    "comm_bytes": [4096, 1 << 20, 16 << 20, 64 << 20],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timer(device):
    import torch

    if device.type == "cuda":

        def run(fn, reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
    else:

        def run(fn, reps):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps

    return run


def time_op(fn, device, min_time: float = 0.02, max_reps: int = 200) -> float:
    """Seconds per call. GPU: the fastest of 3 event-timed batches. CPU: the 20th percentile
    of individually timed calls -- on a shared machine noise only ever adds time, and a call
    that waited for a descheduled thread says nothing about the hardware."""
    run = _timer(device)
    fn()
    fn()  # warm-up: allocation, kernel selection
    once = max(run(fn, 1), 1e-7)
    reps = int(min(max_reps, max(5, min_time / once)))
    if device.type == "cuda":
        return float(min(run(fn, max(1, reps // 3)) for _ in range(3)))
    times = [run(fn, 1) for _ in range(reps)]
    return float(np.percentile(times, 20))


def fit_roofline(flops, nbytes, seconds) -> dict:
    """Fit time = o + max(flops / F, bytes / B); returns overhead_s, flops_per_s, bytes_per_s,
    mean_abs_log_err. Candidates for F and B are the rates each sample implies."""
    f, b, t = (np.asarray(x, dtype=np.float64) for x in (flops, nbytes, seconds))
    best = None
    for o in np.linspace(0.0, 0.95 * t.min(), 24):
        rest = t - o
        f_cands = np.unique(f / rest)
        b_cands = np.unique(b / rest)
        for F in f_cands:
            for B in b_cands:
                pred = o + np.maximum(f / F, b / B)
                err = float(np.mean(np.abs(np.log(pred / t))))
                key = (round(err, 9), -B, -F)
                if best is None or key < best[0]:
                    best = (key, o, F, B, err)
    _, o, F, B, err = best
    return {"overhead_s": float(o), "flops_per_s": float(F), "bytes_per_s": float(B), "mean_abs_log_err": err}


def fit_linear(x, seconds) -> dict:
    """Fit time = latency + x / bandwidth by least squares (non-negative latency)."""
    x, t = np.asarray(x, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    slope, intercept = np.polyfit(x, t, 1)
    slope = max(slope, 1e-15)
    intercept = max(intercept, 0.0)
    pred = intercept + slope * x
    return {
        "latency_s": float(intercept),
        "bytes_per_s": float(1.0 / slope),
        "mean_abs_log_err": float(np.mean(np.abs(np.log(pred / t)))),
    }


def _gemm_samples(device, dtype, grid) -> list[dict]:
    import torch

    out = []
    d = torch.tensor([], dtype=dtype).element_size()
    for n, k in grid["gemm_nk"]:
        w = torch.randn(k, n, device=device, dtype=dtype)
        for m in grid["gemm_m"]:
            a = torch.randn(m, k, device=device, dtype=dtype)
            t = time_op(lambda a=a, w=w: torch.matmul(a, w), device)
            out.append(
                {
                    "m": m,
                    "n": n,
                    "k": k,
                    "flops": 2.0 * m * n * k,
                    "bytes": (m * k + k * n + m * n) * d,
                    "s": t,
                }
            )
    return out


def _attention_samples(device, dtype, grid) -> tuple[list[dict], list[dict]]:
    import torch
    import torch.nn.functional as F

    d = torch.tensor([], dtype=dtype).element_size()
    decode, prefill = [], []
    for bsz, h, ctx, hd in grid["decode"]:
        q = torch.randn(bsz, h, 1, hd, device=device, dtype=dtype)
        k = torch.randn(bsz, h, ctx, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        t = time_op(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), device)
        decode.append(
            {
                "batch": bsz,
                "heads": h,
                "ctx": ctx,
                "head_dim": hd,
                "flops": 4.0 * bsz * h * ctx * hd,
                "bytes": (2.0 * bsz * h * ctx * hd + 2.0 * bsz * h * hd) * d,
                "s": t,
            }
        )
    for bsz, h, ctx, hd in grid["prefill"]:
        q = torch.randn(bsz, h, ctx, hd, device=device, dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        t = time_op(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
        prefill.append(
            {
                "batch": bsz,
                "heads": h,
                "ctx": ctx,
                "head_dim": hd,
                "flops": 4.0 * bsz * h * hd * ctx * (ctx + 1) / 2,
                "bytes": 4.0 * bsz * h * ctx * hd * d,
                "s": t,
            }
        )
    return decode, prefill


def _comm_worker(rank: int, store_path: str, sizes: list[int], queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    results = []
    for nbytes in sizes:
        x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        for op in ("all_reduce", "p2p"):

            def call(op=op, x=x):
                if op == "all_reduce":
                    dist.all_reduce(x)
                elif rank == 0:
                    dist.send(x, 1)
                    dist.recv(x, 1)
                else:
                    dist.recv(x, 0)
                    dist.send(x, 0)

            for _ in range(2):
                call()
            reps = 10
            dist.barrier()
            t = time.perf_counter()
            for _ in range(reps):
                call()
            el = (time.perf_counter() - t) / reps
            if op == "p2p":
                el /= 2  # a round trip is two one-way messages
            results.append({"op": op, "bytes": x.numel() * 4, "ranks": 2, "s": el})
    dist.destroy_process_group()
    if rank == 0:
        queue.put(results)


def _comm_samples(sizes: list[int], timeout: float = 60.0) -> tuple[list[dict] | None, str]:
    import multiprocessing as mp

    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return None, "fork start method unavailable"
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        q = ctx.Queue()
        procs = [ctx.Process(target=_comm_worker, args=(r, store, sizes, q)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            res = q.get(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - report any failure as "not measured"
            res = None
            note = f"gloo timing failed: {exc!r}"
        else:
            note = "gloo, 2 forked processes, shared memory / loopback"
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
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimInputError("calibrate: --device cuda asked for but torch sees no CUDA device")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    grid = grid or (QUICK if quick else FULL)
    t0 = time.perf_counter()
    gemm = _gemm_samples(dev, dtype, grid)
    decode, prefill = _attention_samples(dev, dtype, grid)
    comm, comm_note = (None, "skipped")
    if collectives and dev.type == "cpu":
        comm, comm_note = _comm_samples(grid["comm_bytes"])
    elif collectives:
        comm_note = "not measured: one GPU here (NCCL needs two ranks)"
    g = fit_roofline([s["flops"] for s in gemm], [s["bytes"] for s in gemm], [s["s"] for s in gemm])
    a = fit_roofline([s["flops"] for s in decode], [s["bytes"] for s in decode], [s["s"] for s in decode])
    pf = [s["flops"] / max(s["s"] - a["overhead_s"], 1e-9) for s in prefill]
    out = {
        "schema": SCHEMA,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device_kind": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_bytes": torch.tensor([], dtype=dtype).element_size(),
        "gemm": g,
        "attention": {**a, "prefill_flops_per_s": float(max(pf)) if pf else a["flops_per_s"]},
        "comm": None,
        "comm_note": comm_note,
        "samples": {"gemm": gemm, "decode": decode, "prefill": prefill, "comm": comm},
        "seconds": None,
    }
    if comm:
        ar = [s for s in comm if s["op"] == "all_reduce"]
        p2p = [s for s in comm if s["op"] == "p2p"]
        # Ring all-reduce over n ranks moves 2(n-1)/n of the bytes: x for the fit.
        out["comm"] = {
            "all_reduce": fit_linear(
                [2 * (s["ranks"] - 1) / s["ranks"] * s["bytes"] for s in ar], [s["s"] for s in ar]
            ),
            "p2p": fit_linear([s["bytes"] for s in p2p], [s["s"] for s in p2p]),
        }
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


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
    if cal.get("schema") != SCHEMA or "gemm" not in cal or "attention" not in cal:
        raise SimInputError(f"{path}: not a fapool calibration (schema {SCHEMA})")
    cal["_path"] = str(path)
    return cal


def apply_calibration(hw: HardwareProfile, cal: dict) -> HardwareProfile:
    """The profile with fitted rates in place of the preset's (memory and, unless measured,
    the interconnect stay the preset's)."""
    g, a = cal["gemm"], cal["attention"]
    changes = {
        "gemm_flops": g["flops_per_s"],
        "gemm_bandwidth": g["bytes_per_s"],
        "kernel_overhead": g["overhead_s"],
        "attn_flops": a.get("prefill_flops_per_s", a["flops_per_s"]),
        "attn_bandwidth": a["bytes_per_s"],
        "attn_overhead": a["overhead_s"],
        "dtype_bytes": int(cal.get("dtype_bytes", hw.dtype_bytes)),
        "source": f"calibration {cal.get('_path', '')} ({cal.get('device_name', '?')})",
    }
    comm = cal.get("comm")
    if comm:
        ar, p2p = comm["all_reduce"], comm["p2p"]
        link = LinkProfile(
            bandwidth=p2p["bytes_per_s"],
            latency=p2p["latency_s"],
            hop_latency=max(0.0, ar["latency_s"] - p2p["latency_s"]) / 2,
        )
        changes["intra_node"] = link
        changes["inter_node"] = link
    return hw.replace(**changes)


def summary_lines(cal: dict) -> list[str]:
    g, a = cal["gemm"], cal["attention"]
    lines = [
        (
            f"device: {cal['device_kind']} ({cal['device_name']}), torch {cal['torch']}, {cal['dtype']}, "
            f"{cal['threads']} threads, {cal['seconds']} s"
        ),
        (
            f"GEMM: {g['flops_per_s'] / 1e9:,.1f} GFLOP/s, {g['bytes_per_s'] / 1e9:,.2f} GB/s, "
            f"overhead {g['overhead_s'] * 1e6:.1f} us (fit error {math.expm1(g['mean_abs_log_err']):.0%})"
        ),
        (
            f"attention: decode {a['bytes_per_s'] / 1e9:,.2f} GB/s, prefill {a['prefill_flops_per_s'] / 1e9:,.1f} "
            f"GFLOP/s, overhead {a['overhead_s'] * 1e6:.1f} us (fit error {math.expm1(a['mean_abs_log_err']):.0%})"
        ),
    ]
    if max(g["mean_abs_log_err"], a["mean_abs_log_err"]) > 0.4:
        lines.append(
            "warning: the roofline fits these timings badly; a busy machine (other processes, more "
            "threads than free cores) is the usual cause -- rerun, or try --threads 1"
        )
    if cal.get("comm"):
        ar, p2p = cal["comm"]["all_reduce"], cal["comm"]["p2p"]
        lines.append(
            f"comm ({cal['comm_note']}): p2p {p2p['bytes_per_s'] / 1e9:.2f} GB/s + {p2p['latency_s'] * 1e6:.0f} us; "
            f"all-reduce {ar['bytes_per_s'] / 1e9:.2f} GB/s + {ar['latency_s'] * 1e6:.0f} us"
        )
    else:
        lines.append(f"comm: {cal['comm_note']}")
    return lines
