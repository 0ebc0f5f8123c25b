"""`fapool bench linear`: decode-sized linears (M <= 64 rows), the Triton small-M matmul's
settings against cuBLAS (torch's F.linear) on the same weights, in one run on one GPU.

Each timing is one CUDA graph of `--calls` launches that cycle through enough copies of the
weight to overflow L2, as a decode step reads each layer's weights once; the figure is the
median replay over the launches, as effective weight bandwidth (bytes of W per second) beside
the device copy bandwidth of the same run. The sweep's best setting per (row bucket, N, K) is
printed as the `TUNED` table of fapool.layers.triton_linear.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from typing import Any

import torch

from fapool.bench.results import environment, write_result

# (name, N, K) of the seed 000 preset (hidden 4096, 32 heads, non-gated FFN 16384, vocab 32000)
# and of a Llama-3-8B-shaped model (GQA 32/8, gated FFN 14336, vocab 128256).
SHAPES = {
    "seed000": [
        ("qkv", 12288, 4096),
        ("o", 4096, 4096),
        ("up", 16384, 4096),
        ("down", 4096, 16384),
        ("lm_head", 32000, 4096),
    ],
    "llama8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
}
L2_OVERFLOW_BYTES = 200 * 2**20  # several times an H100/H200's L2


def time_graph(fn, calls: int, replays: int = 10) -> float:
    """Median seconds per call of `fn(i)` for i in range(calls), captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):  # warm-up: compiles and the allocator's first blocks
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(replays + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    del graph
    return statistics.median(times[2:])


def candidate_configs(n: int, k: int, num_sms: int):
    """The sweep's settings: tiles of 32-128 rows of W, K tiles of 128-256, 3-5 stages, and
    split counts from none up to the one that puts about four programs on every SM."""
    from fapool.layers.triton_linear import SkinnyConfig

    for block_n, block_k, stages in itertools.product((32, 64, 128), (128, 256), (3, 4, 5)):
        programs = -(-n // block_n)
        splits = [1]
        while programs * splits[-1] < 4 * num_sms and k // (splits[-1] * 2) >= 2 * block_k:
            splits.append(splits[-1] * 2)
        for split in splits:
            if split > 1 and programs * split < num_sms // 2:
                continue
            yield SkinnyConfig(block_n, block_k, split, num_warps=4, num_stages=stages)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import track

    from fapool.bench.tpot import copy_bandwidth
    from fapool.layers.triton_linear import pick_config, row_bucket, skinny_linear

    dtype = torch.bfloat16
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bps = copy_bandwidth()
    rows_out: list[dict[str, Any]] = []
    tuned: dict[str, dict[str, Any]] = {}
    work = [(model, name, n, k, m) for model in ns.models for (name, n, k) in SHAPES[model] for m in ns.rows]
    for model, name, n, k, m in track(work, description="linears"):
        wbytes = n * k * 2
        copies = max(2, -(-L2_OVERFLOW_BYTES // wbytes))
        torch.manual_seed(0)
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        calls = max(copies, ns.calls)
        cublas_s = time_graph(lambda i, x=x, w=weights: torch.nn.functional.linear(x, w[i % len(w)]), calls)
        row = {
            "model": model,
            "name": name,
            "m": m,
            "n": n,
            "k": k,
            "cublas_us": cublas_s * 1e6,
            "cublas_TBps": wbytes / cublas_s / 1e12,
            "configs": [],
        }
        sweep = m in ns.sweep_rows
        configs = list(candidate_configs(n, k, num_sms)) if sweep else [pick_config(m, n, k)]
        if configs == [None]:  # not swept: the engine's choice, here cuBLAS
            row.update(choice="cublas", x_cublas=1.0)
            rows_out.append(row)
            continue
        for cfg in configs:
            try:
                t = time_graph(
                    lambda i, x=x, w=weights, c=cfg: skinny_linear(x, w[i % len(w)], None, c), calls
                )
            except Exception as e:  # noqa: BLE001 -- a setting that does not compile is a sweep result
                row["configs"].append(
                    {"config": cfg and cfg.__dict__, "error": f"{type(e).__name__}: {e}"[:160]}
                )
                continue
            row["configs"].append({"config": cfg and cfg.__dict__, "us": t * 1e6, "TBps": wbytes / t / 1e12})
        ok = [c for c in row["configs"] if "us" in c]
        best = min(ok, key=lambda c: c["us"]) if ok else None
        if best:
            row.update(
                best_us=best["us"],
                best_TBps=best["TBps"],
                best_config=best["config"],
                x_cublas=cublas_s * 1e6 / best["us"],
            )
            if sweep:
                key = f"{row_bucket(m)},{n},{k}"
                if key not in tuned or tuned[key]["x_cublas"] < row["x_cublas"]:
                    tuned[key] = {"config": best["config"], "x_cublas": row["x_cublas"]}
        rows_out.append(row)
        weights.clear()
        torch.cuda.empty_cache()
    return {
        "env": environment("cuda"),
        "copy_TBps": copy_bps / 1e12,
        "num_sms": num_sms,
        "calls": ns.calls,
        "rows": rows_out,
        "tuned": tuned,
    }


def summary(res: dict[str, Any]) -> str:
    ratios = [r["x_cublas"] for r in res["rows"] if "x_cublas" in r]
    return (
        f"small-M Triton matmul vs cuBLAS, {len(ratios)} (shape, M) points: x{min(ratios):.2f}-{max(ratios):.2f} "
        f"cuBLAS speed; copy {res['copy_TBps']:.2f} TB/s"
        if ratios
        else "no rows"
    )


def table(res: dict[str, Any]) -> str:
    lines = [
        f"{'model':8} {'name':8} {'M':>3} {'N':>6} {'K':>6} {'cuBLAS TB/s':>11} {'ours TB/s':>9} {'x':>5}  best"
    ]
    for r in res["rows"]:
        lines.append(
            f"{r['model']:8} {r['name']:8} {r['m']:3d} {r['n']:6d} {r['k']:6d} {r['cublas_TBps']:11.2f} "
            f"{r.get('best_TBps', 0):9.2f} {r.get('x_cublas', 0):5.2f}  {r.get('best_config') or r.get('choice')}"
        )
    return "\n".join(lines)


def main(ns: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("fapool bench linear needs a CUDA GPU")
    res = run(ns)
    print(table(res))
    if not ns.no_save:
        print(write_result("linear", res, summary(res), ns.out_dir))
    return 0


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear", help="decode-sized linears: the Triton small-M matmul vs cuBLAS (GPU)")
    p.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=["seed000", "llama8b"],
        help=f"shape sets, of {', '.join(SHAPES)}",
    )
    p.add_argument("--rows", type=_ints, default=[1, 8, 16, 32, 64], help="M values timed")
    p.add_argument("--sweep-rows", type=_ints, default=[8, 32, 64], help="M values whose settings are swept")
    p.add_argument("--calls", type=int, default=20, help="launches per timed graph")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=main)
