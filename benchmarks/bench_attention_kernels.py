"""Attention kernel benchmarks: fapool's Triton kernels against SDPA and the copy bandwidth.

    python benchmarks/bench_attention_kernels.py [--sweep] [--out-dir DIR]
    python benchmarks/bench_attention_kernels.py --plot RESULTS.json   # plot only, no GPU

Measured side by side in one process, L2 flushed before each timed call (triton do_bench,
median):
- decode, GQA 32/8, head dim 128, bf16, one query per sequence at the end of its context:
  effective KV bandwidth (bytes of K and V needed / time) of our kernel on 16-token pages
  scattered at random in a pool, on the same pages in order (identity block table), on
  contiguous KV (one page per sequence); SDPA flash and cuDNN on the KV stored contiguously;
  the device copy bandwidth (bytes read + written) as the ceiling.
- prefill, causal, 32 heads, head dim 128, bf16: TFLOP/s of our kernel over 16-token pages
  against SDPA flash and cuDNN on contiguous tensors.
- KV write: the Triton scatter against torch index_copy_.
Writes kernels_<date>.json (GPU name, date, commit, shapes, peers) and a bandwidth plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE_SHAPES = [(1, 32768), (8, 16384), (8, 32768)] + [(b, n) for b in (16, 32, 64) for n in (2048, 8192, 32768)] + [(128, 8192)]
PREFILL_LENS = (4096, 16384)
DECODE_SWEEP_SHAPES = ((16, 2048), (16, 8192), (16, 32768), (32, 2048), (64, 2048), (32, 8192))
DECODE_SWEEP_CONFIGS = (  # block_n, num_warps, num_stages
    (64, 4, 2),
    (64, 4, 3),
    (64, 4, 4),
    (32, 4, 3),
    (32, 4, 4),
    (32, 4, 5),
    (128, 4, 2),
    (128, 8, 3),
)
DECODE_SWEEP_SPLITS = (1, 2, 3, 4, 6, 8, 16)
FP8_SWEEP_SHAPES = ((8, 32768), (16, 32768), (64, 32768), (64, 2048))
FP8_SWEEP_CONFIGS = tuple(  # block_n, num_warps, num_stages, dots in fp16 (else the query's bf16), warp split
    (bn, nw, ns, True, True)  # the warp-split kernel: each warp block_n // num_warps tokens of a tile (>= 16)
    for bn, nw, ns in ((32, 2, 3), (32, 2, 4), (32, 2, 5), (64, 2, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3))
) + ((32, 2, 3, False, True), (128, 4, 3, True, False), (128, 4, 4, True, False), (64, 4, 3, True, False))
PREFILL_SWEEP_CONFIGS = (  # block_m, block_n, num_warps, num_stages
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (128, 128, 4, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def _commit() -> str:
    if os.environ.get("FAPOOL_COMMIT"):
        return os.environ["FAPOOL_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="fapool bench kernels")
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel tile/warp/stage/split settings")
    ap.add_argument(
        "--out-dir", default=None, help="where JSON and PNG go (default benchmarks/results, benchmarks/plots)"
    )
    ap.add_argument("--plot", default=None, help="only draw the plot from an existing results JSON")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--fp8-sweep", action="store_true", help="sweep tile/warp/stage settings of the FP8 decode")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--decode-shapes", default=None, help="BxL,... decode shapes (default: all)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            res = json.load(f)
        plot(res, args.out_dir or os.path.join(HERE, "plots"))
        return res
    res = run(args)
    summary(res)
    if not args.no_save:
        from fapool.bench.results import environment, write_result

        res["env"] = environment("cuda")
        path = write_result("kernels", res, one_line(res), out_dir=args.out_dir)
        print("wrote", path)
        plot(res, args.out_dir or os.path.join(HERE, "plots"))
    return res


def one_line(res: dict) -> str:
    """The RESULTS.md summary: decode and prefill ratios against the peers of the same run."""
    parts = [f"copy {res['copy_TBps']:.2f} TB/s"]
    rows = res.get("decode", {}).get("rows", [])
    if rows:
        xf = [r["ratio_vs_flash"] for r in rows if r.get("ratio_vs_flash")]
        xc = [r["ratio_vs_copy"] for r in rows]
        po = [r["paging_overhead"] for r in rows]
        parts.append(
            f"decode x{min(xf):.2f}-{max(xf):.2f} SDPA flash, {min(xc):.2f}-{max(xc):.2f} of copy, "
            f"paging overhead {min(po):+.1%}..{max(po):+.1%}"
        )
    for r in res.get("prefill", {}).get("rows", []):
        parts.append(f"prefill {r['seq_len']}: Triton x{r['ratio_vs_flash']:.2f} flash")
        if r.get("backend_ratio_vs_cudnn"):
            parts.append(f"backend x{r['backend_ratio_vs_cudnn']:.2f} cuDNN")
    return "; ".join(parts)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import sdpa_kernel

    from fapool.attention import AttentionMetadata
    from fapool.attention import triton_decode as td
    from fapool.attention import triton_prefill as tp

    dev = "cuda"
    bf16 = torch.bfloat16

    def bench(fn) -> float:  # median ms, L2 flushed before each call
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    def rel_err(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    res = {
        "gpu": torch.cuda.get_device_name(0),
        "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "timing": "triton.testing.do_bench median, L2 flushed before each call",
        "defaults": {
            "decode": dict(
                block_n=td.DEFAULT_BLOCK_N,
                num_warps=td.DEFAULT_NUM_WARPS,
                num_stages=td.DEFAULT_NUM_STAGES,
                program_cost_tiles=td.PROGRAM_COST_TILES,
                reduce_cost_tiles=td.REDUCE_COST_TILES,
            ),
            "prefill": dict(
                block_m=tp.DEFAULT_BLOCK_M,
                block_n=tp.DEFAULT_BLOCK_N,
                num_warps=tp.DEFAULT_NUM_WARPS,
                num_stages=tp.DEFAULT_NUM_STAGES,
            ),
        },
    }
    src = torch.randn(1024**3, dtype=bf16, device=dev)  # 2 GiB
    dst = torch.empty_like(src)
    res["copy_TBps"] = 2 * src.nbytes / bench(lambda: dst.copy_(src)) / 1e9
    src = dst = None
    print(f"{res['gpu']}  copy {res['copy_TBps']:.2f} TB/s", flush=True)

    def sdpa(backend, *a, **kw):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*a, **kw)

    # ---------------- decode ----------------
    def decode_case(B, L):
        q = torch.randn(B, NUM_HEADS, HEAD_DIM, dtype=bf16, device=dev)
        k = torch.randn(B, NUM_KV_HEADS, L, HEAD_DIM, dtype=bf16, device=dev)  # SDPA layout
        v = torch.randn_like(k)
        nb = L // PAGE
        table = torch.randperm(B * nb, device=dev).view(B, nb)
        pools = {}
        for name, t in (("k", k), ("v", v)):
            rows = t.permute(0, 2, 1, 3).contiguous()  # [B, L, Hkv, D]
            pool = torch.empty(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
            pool[table.flatten()] = rows.view(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM)
            pools[name] = (pool, rows)

        def mk(tables):
            return AttentionMetadata.build([1] * B, [L - 1] * B, [L] * B, tables, [-1] * B, device=dev)

        metas = {
            "paged": mk(table.int().tolist()),
            "identity": mk([list(range(b * nb, (b + 1) * nb)) for b in range(B)]),
            "contiguous": mk([[b] for b in range(B)]),
        }
        caches = {
            "paged": (pools["k"][0], pools["v"][0]),
            "identity": (
                pools["k"][1].view(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM),
                pools["v"][1].view(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM),
            ),
            "contiguous": (pools["k"][1], pools["v"][1]),  # [B, L, Hkv, D]: one page of L tokens each
        }
        return q, k, v, metas, caches

    scale = HEAD_DIM**-0.5
    if not args.skip_decode:
        res["decode"] = decode_section(args, res, bench, rel_err, sdpa, decode_case, scale)
    if not args.skip_prefill:
        res["prefill"] = prefill_section(args, bench, rel_err, sdpa, scale)
    res["kv_write"] = kv_write_section(bench)
    res["compiled"] = compiled_kernels()
    return res


def _try(fn, *a, **kw):
    """fn's result, or None and the error text (a backend may refuse a shape on some builds)."""
    try:
        return fn(*a, **kw), None
    except Exception as ex:
        return None, f"{type(ex).__name__}: {str(ex)[:160]}"


def graphed(fn):
    """fn captured in a CUDA graph: timing its replay measures GPU time, not Python and launch
    overhead (which dominates kernels of tens of microseconds, as in decode at batch 16 x 2K;
    the engine replays decode steps from graphs)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def host_us(fn, n: int = 300) -> float:
    """Host time per call of fn on a problem too small for the GPU to be the bottleneck."""
    import time

    import torch

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def fp8_decode(row, q, cache, meta, scale, out, lse, ref, bench, rel_err, kv_bytes, sweep=None) -> None:
    """The same paged decode over an FP8 (e4m3) copy of the cache with per-tensor scales (the
    engine's --kv-cache-dtype fp8): speed-up over the bf16 cache and error against SDPA's flash."""
    from fapool.attention import triton_decode as td
    from fapool.attention.kv_quant import FP8_DTYPE, quantize, scale_for

    ks, vs = (scale_for(float(c.abs().max())) for c in cache)
    k8, v8 = quantize(cache[0], ks, FP8_DTYPE), quantize(cache[1], vs, FP8_DTYPE)
    fn = partial(td.paged_decode, q, k8, v8, meta, scale, out, lse, k_scale=ks, v_scale=vs)
    fn()
    row["ours_paged_fp8_rel_err_vs_flash"] = rel_err(out, ref)
    graph = graphed(fn)
    ms = bench(graph.replay)
    row["ours_paged_fp8_TBps"] = kv_bytes / 2 / ms / 1e9  # bytes it really reads
    row["fp8_speedup_vs_bf16"] = (kv_bytes / ms / 1e9) / row["ours_paged_TBps"]  # t_bf16 / t_fp8
    del graph
    int8_decode(row, q, cache, meta, scale, out, lse, ref, bench, rel_err, kv_bytes)
    if sweep is None:
        return
    for bn, nw, ns, dot16, ws in FP8_SWEEP_CONFIGS:
        auto = td.auto_num_splits(q.shape[0], NUM_KV_HEADS, meta.max_kv_len, HEAD_DIM, 1, q.device, bn, nw, ns, ws)
        tuned = partial(fn, block_n=bn, num_warps=nw, num_stages=ns, num_splits=auto, dot_fp16=dot16, warp_split=ws)
        r = {"batch": q.shape[0], "context": meta.max_kv_len, "block_n": bn, "num_warps": nw, "num_stages": ns,
             "dot_fp16": dot16, "warp_split": ws, "num_splits": auto}
        graph, err = _try(graphed, tuned)
        ms, err = (None, err) if err else _try(bench, graph.replay)
        r.update({"error": err} if err else {"fp8_TBps": kv_bytes / 2 / ms / 1e9,
                                             "speedup_vs_bf16": (kv_bytes / ms / 1e9) / row["ours_paged_TBps"]})
        sweep.append(r)
        print("fp8 sweep", r, flush=True)
        del graph


def int8_decode(row, q, cache, meta, scale, out, lse, ref, bench, rel_err, kv_bytes) -> None:
    """The same paged decode over an int8 copy of the cache with a scale a token and KV head (the
    engine's --kv-cache-dtype int8): speed-up over the bf16 cache (it reads half the bytes plus
    4 of scales a token and KV head) and error against SDPA's flash."""
    from fapool.attention import triton_decode as td
    from fapool.attention.kv_quant import quantize_int8_cache

    (k8, ks), (v8, vs) = (quantize_int8_cache(c) for c in cache)
    fn = partial(td.paged_decode, q, k8, v8, meta, scale, out, lse, k_pages=ks, v_pages=vs)
    fn()
    row["ours_paged_int8_rel_err_vs_flash"] = rel_err(out, ref)
    graph = graphed(fn)
    ms = bench(graph.replay)
    row["ours_paged_int8_TBps"] = kv_bytes * (HEAD_DIM + 4) / (2 * HEAD_DIM) / ms / 1e9  # bytes it reads
    row["int8_speedup_vs_bf16"] = (kv_bytes / ms / 1e9) / row["ours_paged_TBps"]
    del graph


def decode_section(args, res, bench, rel_err, sdpa, decode_case, scale) -> dict:
    import torch
    from torch.nn.attention import SDPBackend

    from fapool.attention import triton_decode as td

    rows, sweep, fp8_rows = [], [], []
    shapes = DECODE_SHAPES
    if args.decode_shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.decode_shapes.split(",")]
    for B, L in shapes:
        q, k, v, metas, caches = decode_case(B, L)
        kv_bytes = 2 * B * L * NUM_KV_HEADS * HEAD_DIM * 2
        out = torch.empty_like(q)
        lse = torch.empty(B, NUM_HEADS, dtype=torch.float32, device=q.device)
        row = {
            "batch": B,
            "context": L,
            "kv_bytes": kv_bytes,
            "num_splits": td.auto_num_splits(B, NUM_KV_HEADS, L, HEAD_DIM, 2, q.device),
        }
        q4 = q[:, :, None]
        ref = sdpa(SDPBackend.FLASH_ATTENTION, q4, k, v, scale=scale, enable_gqa=True)[:, :, 0]
        for name in ("paged", "identity", "contiguous"):
            fn = partial(td.paged_decode, q, *caches[name], metas[name], scale, out, lse)
            fn()
            row[f"ours_{name}_rel_err_vs_flash"] = rel_err(out, ref)
            graph = graphed(fn)
            row[f"ours_{name}_TBps"] = kv_bytes / bench(graph.replay) / 1e9
            if name == "paged":
                row["ours_paged_eager_TBps"] = kv_bytes / bench(fn) / 1e9
            del graph
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            fn = partial(sdpa, be, q4, k, v, scale=scale, enable_gqa=True)
            graph, err = _try(graphed, fn)
            ms, err = (None, err) if err else _try(bench, graph.replay)
            row[f"sdpa_{name}_TBps"] = kv_bytes / ms / 1e9 if ms else None
            if err:
                row[f"sdpa_{name}_error"] = err
            ms, err = _try(bench, fn)
            row[f"sdpa_{name}_eager_TBps"] = kv_bytes / ms / 1e9 if ms else None
            del graph
        fp8_sweep = fp8_rows if args.fp8_sweep and (B, L) in FP8_SWEEP_SHAPES else None
        fp8_decode(row, q, caches["paged"], metas["paged"], scale, out, lse, ref, bench, rel_err, kv_bytes, fp8_sweep)
        flash = row["sdpa_flash_TBps"]
        row["ratio_vs_flash"] = row["ours_paged_TBps"] / flash if flash else None
        row["ratio_vs_copy"] = row["ours_paged_TBps"] / res["copy_TBps"]
        row["paging_overhead"] = row["ours_contiguous_TBps"] / row["ours_paged_TBps"] - 1
        rows.append(row)
        print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        if args.sweep and (B, L) in DECODE_SWEEP_SHAPES:
            for bn, nw, ns in DECODE_SWEEP_CONFIGS:
                auto = td.auto_num_splits(B, NUM_KV_HEADS, L, HEAD_DIM, 2, q.device, bn, nw, ns)
                for splits in sorted(set(DECODE_SWEEP_SPLITS) | {auto}):
                    fn = partial(
                        td.paged_decode,
                        q,
                        *caches["paged"],
                        metas["paged"],
                        scale,
                        out,
                        lse,
                        num_splits=splits,
                        block_n=bn,
                        num_warps=nw,
                        num_stages=ns,
                    )
                    r = {
                        "batch": B,
                        "context": L,
                        "block_n": bn,
                        "num_warps": nw,
                        "num_stages": ns,
                        "num_splits": splits,
                        "auto": splits == auto,
                    }
                    graph, err = _try(graphed, fn)
                    ms, err = (None, err) if err else _try(bench, graph.replay)
                    if err:
                        r["error"] = err
                    else:
                        r["TBps"] = kv_bytes / ms / 1e9
                        r["rel_err"] = rel_err(out, ref)
                    del graph
                    sweep.append(r)
                    print("sweep", r, flush=True)
        del q, k, v, metas, caches, ref
        torch.cuda.empty_cache()
    # Host cost per call (Python, checks, launches) on a problem the GPU finishes quickly.
    q, k, v, metas, caches = decode_case(1, 64)
    out, lse = torch.empty_like(q), torch.empty(1, NUM_HEADS, dtype=torch.float32, device=q.device)
    host = {
        "ours_paged_decode_us": host_us(
            partial(td.paged_decode, q, *caches["paged"], metas["paged"], scale, out, lse)
        ),
        "sdpa_flash_us": host_us(
            partial(sdpa, SDPBackend.FLASH_ATTENTION, q[:, :, None], k, v, scale=scale, enable_gqa=True)
        ),
    }
    print("host", host, flush=True)
    shape = dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype="bf16", page=PAGE)
    timing = (
        "CUDA-graph replay (GPU time) for the main figures and the sweep; *_eager_* without a graph, "
        "where Python and launch overhead can exceed the kernel at small sizes"
    )
    return {"shape": shape, "timing": timing, "rows": rows, "sweep": sweep, "fp8_sweep": fp8_rows, "host_overhead": host}


def prefill_section(args, bench, rel_err, sdpa, scale) -> dict:
    import torch
    from torch.nn.attention import SDPBackend

    from fapool.attention import AttentionMetadata
    from fapool.attention.triton_backend import TritonBackend
    from fapool.attention.triton_prefill import paged_prefill

    bf16, dev = torch.bfloat16, "cuda"
    rows, sweep = [], []
    for S in PREFILL_LENS:
        flops = 4 * NUM_HEADS * S * S * HEAD_DIM / 2
        q = torch.randn(1, NUM_HEADS, S, HEAD_DIM, dtype=bf16, device=dev)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        nb = S // PAGE
        table = torch.randperm(nb, device=dev)
        kc = torch.empty(nb, PAGE, NUM_HEADS, HEAD_DIM, dtype=bf16, device=dev)
        vc = torch.empty_like(kc)
        kc[table] = k[0].transpose(0, 1).reshape(nb, PAGE, NUM_HEADS, HEAD_DIM)
        vc[table] = v[0].transpose(0, 1).reshape(nb, PAGE, NUM_HEADS, HEAD_DIM)
        k_rows = k[0].transpose(0, 1).contiguous()[None]  # [1 page of S tokens, S, H, D]
        v_rows = v[0].transpose(0, 1).contiguous()[None]
        qt = q[0].transpose(0, 1).contiguous()  # [S, H, D]
        meta = AttentionMetadata.build([S], [0], [S], [table.int().tolist()], [-1] * S, device=dev)
        meta_contig = AttentionMetadata.build([S], [0], [S], [[0]], [-1] * S, device=dev)
        out = torch.empty_like(qt)
        lse = torch.empty(S, NUM_HEADS, dtype=torch.float32, device=dev)
        ref = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1)
        row = {"seq_len": S, "flops": flops}
        for name, args_ in (("paged", (kc, vc, meta)), ("contiguous", (k_rows, v_rows, meta_contig))):
            fn = partial(paged_prefill, qt, *args_[:2], args_[2], scale, out, lse)
            fn()
            row[f"ours_{name}_rel_err_vs_flash"] = rel_err(out, ref)
            row[f"ours_{name}_TFLOPs"] = flops / bench(fn) / 1e9
        # What the engine runs on these pages: the backend's dispatch (cuDNN for long chunks),
        # given the step's new K/V rows as the model passes them.
        fn = partial(TritonBackend().forward, qt, kc, vc, meta, scale, new_kv=(k_rows[0], v_rows[0]))
        row["ours_backend_rel_err_vs_flash"] = rel_err(fn()[0], ref)
        row["ours_backend_TFLOPs"] = flops / bench(fn) / 1e9
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            ms, err = _try(bench, partial(sdpa, be, q, k, v, is_causal=True, scale=scale))
            row[f"sdpa_{name}_TFLOPs"] = flops / ms / 1e9 if ms else None
            if err:
                row[f"sdpa_{name}_error"] = err
        row["ratio_vs_flash"] = row["ours_paged_TFLOPs"] / row["sdpa_flash_TFLOPs"]
        if row["sdpa_cudnn_TFLOPs"]:
            row["backend_ratio_vs_cudnn"] = row["ours_backend_TFLOPs"] / row["sdpa_cudnn_TFLOPs"]
        rows.append(row)
        print(row, flush=True)
        if args.sweep:
            for bm, bn, nw, ns in PREFILL_SWEEP_CONFIGS:
                fn = partial(
                    paged_prefill,
                    qt,
                    kc,
                    vc,
                    meta,
                    scale,
                    out,
                    lse,
                    block_m=bm,
                    block_n=bn,
                    num_warps=nw,
                    num_stages=ns,
                )
                r = {"seq_len": S, "block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns}
                ms, err = _try(bench, fn)
                if err:
                    r["error"] = err
                else:
                    r["TFLOPs"] = flops / ms / 1e9
                    r["rel_err"] = rel_err(out, ref)
                sweep.append(r)
                print("sweep", r, flush=True)
        del q, k, v, kc, vc, qt, ref, k_rows, v_rows
        torch.cuda.empty_cache()
    shape = dict(
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_HEADS,
        head_dim=HEAD_DIM,
        dtype="bf16",
        page=PAGE,
        causal=True,
        batch=1,
    )
    return {"shape": shape, "rows": rows, "sweep": sweep, "crossover": crossover_section(bench, scale)}


CROSSOVER_CHUNKS = (512, 1024, 2048, 4096, 8192, 16384)
CROSSOVER_PREFIXES = (0, 4096, 16384)


def crossover_section(bench, scale) -> list[dict]:
    """The Triton prefill kernel against the cuDNN path on the engine's shape (GQA 32/8, paged),
    per chunk length, fresh and over a cached prefix: where CUDNN_MIN_QUERY_LEN belongs."""
    import torch

    from fapool.attention import AttentionMetadata
    from fapool.attention.triton_backend import TritonBackend

    bf16, dev = torch.bfloat16, "cuda"
    triton_only = TritonBackend(cudnn_min_query_len=None)
    cudnn_always = TritonBackend(cudnn_min_query_len=1, cudnn_min_pairs=0)
    rows = []
    for prefix in CROSSOVER_PREFIXES:
        for chunk in CROSSOVER_CHUNKS:
            n = prefix + chunk
            nb = -(-n // PAGE)
            kc = torch.randn(nb, PAGE, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
            vc = torch.randn_like(kc)
            q = torch.randn(chunk, NUM_HEADS, HEAD_DIM, dtype=bf16, device=dev)
            table = torch.randperm(nb).tolist()
            meta = AttentionMetadata.build([chunk], [prefix], [n], [table], [-1] * chunk, device=dev)
            flops = 4 * NUM_HEADS * HEAD_DIM * chunk * (prefix + (chunk + 1) / 2)
            new_kv = tuple(c[table].flatten(0, 1)[prefix:n] for c in (kc, vc))  # as the model passes them
            t_ms = bench(partial(triton_only.forward, q, kc, vc, meta, scale))
            c_ms = bench(partial(cudnn_always.forward, q, kc, vc, meta, scale, new_kv=new_kv))
            a = triton_only.forward(q, kc, vc, meta, scale)[0]
            b = cudnn_always.forward(q, kc, vc, meta, scale, new_kv=new_kv)[0]
            row = dict(
                chunk=chunk,
                prefix=prefix,
                triton_ms=t_ms,
                cudnn_path_ms=c_ms,
                triton_TFLOPs=flops / t_ms / 1e9,
                cudnn_path_TFLOPs=flops / c_ms / 1e9,
                cudnn_speedup=t_ms / c_ms,
                rel_diff=((a.float() - b.float()).norm() / b.float().norm()).item(),
            )
            rows.append(row)
            print("crossover", row, flush=True)
    return rows


def kv_write_section(bench) -> dict:
    import torch

    from fapool.attention.torch_ref import write_kv_torch
    from fapool.attention.triton_kv_write import write_kv

    bf16, dev = torch.bfloat16, "cuda"
    rows = []
    num_blocks = 16384
    kc = torch.randn(num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
    vc = torch.randn_like(kc)
    fk, fv = kc.view(-1, NUM_KV_HEADS, HEAD_DIM), vc.view(-1, NUM_KV_HEADS, HEAD_DIM)
    for T in (64, 16384):
        key = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
        val = torch.randn_like(key)
        slots = torch.randperm(num_blocks * PAGE, device=dev)[:T]
        moved = 2 * 2 * key.numel() * 2  # K and V, read + write

        def index_copy(key=key, val=val, slots=slots):
            fk.index_copy_(0, slots, key)
            fv.index_copy_(0, slots, val)

        row = {"tokens": T, "bytes": moved}
        for name, fn in (
            ("triton", partial(write_kv, kc, vc, key, val, slots)),
            ("torch_index_copy", index_copy),
            ("torch_ref_with_host_filter", partial(write_kv_torch, kc, vc, key, val, slots)),
        ):
            ms = bench(fn)
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_TBps"] = moved / ms / 1e9
            if name != "torch_ref_with_host_filter":  # syncs with the host: not capturable
                graph = graphed(fn)
                row[f"{name}_graph_us"] = bench(graph.replay) * 1e3
                del graph
        rows.append(row)
        print(row, flush=True)
    return {
        "shape": dict(num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, page=PAGE, dtype="bf16"),
        "rows": rows,
    }


def compiled_kernels() -> list[dict]:
    """Registers, shared memory and launch settings of every kernel variant compiled in this run."""
    from fapool.attention import triton_decode, triton_kv_write, triton_prefill

    found = []
    for fn in (
        triton_decode._decode_split_kernel,
        triton_decode._decode_split_kernel_warps,
        triton_decode._decode_reduce_kernel,
        triton_prefill._prefill_kernel,
        triton_kv_write._write_kv_kernel,
    ):
        for caches in getattr(fn, "device_caches", {}).values():
            for ck in caches[0].values():
                md = ck.metadata
                consts = {
                    str(k): v
                    for k, v in getattr(ck.src, "constants", {}).items()
                    if isinstance(v, (int, bool)) and not isinstance(k, tuple)
                }
                found.append(
                    {
                        "kernel": md.name,
                        "num_warps": md.num_warps,
                        "num_stages": md.num_stages,
                        "shared": md.shared,
                        "n_regs": getattr(ck, "n_regs", None),
                        "n_spills": getattr(ck, "n_spills", None),
                        "constants": consts,
                    }
                )
    return found


def plot(res: dict, out_dir: str) -> None:
    if "decode" not in res:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["decode"]["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), sharey=True)
    series = (
        ("ours_paged_TBps", "fapool Triton, 16-token pages (random)", "C0", "-o"),
        ("ours_contiguous_TBps", "fapool Triton, contiguous KV", "C0", "--s"),
        ("sdpa_flash_TBps", "SDPA flash, contiguous", "C1", "-^"),
        ("sdpa_cudnn_TBps", "SDPA cuDNN, contiguous", "C2", "-v"),
    )
    for ax, B in zip(axes, batches, strict=True):
        rs = sorted((r for r in rows if r["batch"] == B), key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        for key, label, color, style in series:
            ys = [r.get(key) for r in rs]
            if any(y is not None for y in ys):
                ax.plot(ctx, ys, style, color=color, label=label)
        fp8 = [r["ours_paged_TBps"] * r["fp8_speedup_vs_bf16"] if "fp8_speedup_vs_bf16" in r else None for r in rs]
        if any(y is not None for y in fp8):  # bf16 bytes over the FP8 kernel's time: above copy = faster than bf16 can be
            ax.plot(ctx, fp8, "-D", color="C3", label="fapool Triton, FP8 cache (bf16-equivalent bytes)")
        int8 = [r["ours_paged_TBps"] * r["int8_speedup_vs_bf16"] if "int8_speedup_vs_bf16" in r else None for r in rs]
        if any(y is not None for y in int8):
            ax.plot(ctx, int8, "-P", color="C4", label="fapool Triton, int8 cache (bf16-equivalent bytes)")
        ax.axhline(res["copy_TBps"], color="gray", ls=":", label=f"device copy {res['copy_TBps']:.2f} TB/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [f"{c // 1024}K" for c in ctx])
        ax.set_title(f"decode, batch {B}")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("effective KV bandwidth (TB/s)")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"GQA 32/8, head dim 128, bf16 — {res['gpu']}, {res['date'][:10]}, {res['commit'][:10]}", fontsize=9
    )
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernels_decode_bandwidth.png")
    fig.savefig(path, dpi=120)
    print("wrote", path)


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x is not None else "n/a"


def summary(res: dict) -> None:
    print(f"\n{res['gpu']}  copy {res['copy_TBps']:.2f} TB/s  commit {res['commit'][:10]}")
    if "decode" in res:
        print("decode TB/s (graph replay; eager in the last two columns)")
        print(
            "   B   L      paged  ident  contig flash  cudnn  x_flash x_copy paging splits  eager: ours flash"
            "  fp8: TB/s x_bf16  int8: TB/s x_bf16"
        )
        keys = (
            "ours_paged_TBps",
            "ours_identity_TBps",
            "ours_contiguous_TBps",
            "sdpa_flash_TBps",
            "sdpa_cudnn_TBps",
        )
        for r in res["decode"]["rows"]:
            cells = " ".join(_fmt(r.get(k), "6.2f") for k in keys)
            print(
                f"   {r['batch']:<3} {r['context']:<6} {cells}  {_fmt(r['ratio_vs_flash'], '.3f')}   "
                f"{r['ratio_vs_copy']:.3f}  {r['paging_overhead']:+.3f}  {r['num_splits']:<3}        "
                f"{_fmt(r.get('ours_paged_eager_TBps'), '5.2f')} "
                f"{_fmt(r.get('sdpa_flash_eager_TBps'), '5.2f')}  "
                f"{_fmt(r.get('ours_paged_fp8_TBps'), '5.2f')} {_fmt(r.get('fp8_speedup_vs_bf16'), '.2f')}  "
                f"{_fmt(r.get('ours_paged_int8_TBps'), '5.2f')} {_fmt(r.get('int8_speedup_vs_bf16'), '.2f')}"
            )
        if "host_overhead" in res["decode"]:
            print("   host us/call:", {k: round(v, 1) for k, v in res["decode"]["host_overhead"].items()})
    if "prefill" in res:
        print("prefill TFLOP/s  S      paged  contig backend flash  cudnn  x_flash  backend/cudnn  rel_err")
        for r in res["prefill"]["rows"]:
            cells = [
                _fmt(r.get(k), "6.1f")
                for k in (
                    "ours_paged_TFLOPs",
                    "ours_contiguous_TFLOPs",
                    "ours_backend_TFLOPs",
                    "sdpa_flash_TFLOPs",
                    "sdpa_cudnn_TFLOPs",
                )
            ]
            print(
                f"                {r['seq_len']:<6} {' '.join(cells)}  {r['ratio_vs_flash']:.3f}   "
                f"{_fmt(r.get('backend_ratio_vs_cudnn'), '.3f')}  {r['ours_paged_rel_err_vs_flash']:.1e}"
            )
        for r in res["prefill"].get("crossover", []):
            print(
                f"  chunk {r['chunk']:<5} prefix {r['prefix']:<5} Triton {r['triton_TFLOPs']:6.1f}  "
                f"cuDNN path {r['cudnn_path_TFLOPs']:6.1f} TFLOP/s  x{r['cudnn_speedup']:.2f}"
            )
    for r in res.get("kv_write", {}).get("rows", []):
        print(
            f"kv_write T={r['tokens']:<6} graph: triton {r['triton_graph_us']:.1f} us  "
            f"index_copy {r['torch_index_copy_graph_us']:.1f} us;  eager: triton {r['triton_us']:.1f} us  "
            f"index_copy {r['torch_index_copy_us']:.1f} us  "
            f"ref+filter {r['torch_ref_with_host_filter_us']:.1f} us"
        )


if __name__ == "__main__":
    main()
