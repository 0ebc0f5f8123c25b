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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE_SHAPES = [(b, l) for b in (16, 32, 64) for l in (2048, 8192, 32768)]
PREFILL_LENS = (4096, 16384)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def _commit() -> str:
    if os.environ.get("FAPOOL_COMMIT"):
        return os.environ["FAPOOL_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel tile/warp/stage/split settings")
    ap.add_argument("--out-dir", default=None, help="where JSON and PNG go (default benchmarks/results, benchmarks/plots)")
    ap.add_argument("--plot", default=None, help="only draw the plot from an existing results JSON")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as f:
            res = json.load(f)
        plot(res, args.out_dir or os.path.join(HERE, "plots"))
        return
    res = run(args)
    date = res["date"][:10]
    res_dir = args.out_dir or os.path.join(HERE, "results")
    os.makedirs(res_dir, exist_ok=True)
    path = os.path.join(res_dir, f"kernels_{date}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    plot(res, args.out_dir or os.path.join(HERE, "plots"))
    summary(res)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fapool.attention import AttentionMetadata
    from fapool.attention import triton_decode as td
    from fapool.attention.torch_ref import write_kv_torch
    from fapool.attention.triton_kv_write import write_kv
    from fapool.attention.triton_prefill import paged_prefill

    dev = "cuda"
    bf16 = torch.bfloat16

    def bench(fn) -> float:  # median ms, L2 flushed before each call
        return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median")

    def rel_err(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    res = {
        "gpu": torch.cuda.get_device_name(0),
        "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "timing": "triton.testing.do_bench median, L2 flushed before each call",
        "defaults": {
            "decode": dict(block_n=td.DEFAULT_BLOCK_N, num_warps=td.DEFAULT_NUM_WARPS, num_stages=td.DEFAULT_NUM_STAGES,
                           programs_per_sm=td.PROGRAMS_PER_SM, min_tiles_per_split=td.MIN_TILES_PER_SPLIT),
        },
    }
    x = torch.randn(1024**3, dtype=bf16, device=dev)
    y = torch.empty_like(x)
    res["copy_TBps"] = 2 * x.numel() * 2 / bench(lambda: y.copy_(x)) / 1e9
    del x, y
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
        mk = lambda tables: AttentionMetadata.build(  # noqa: E731
            [1] * B, [L - 1] * B, [L] * B, tables, [-1] * B, device=dev)
        metas = {
            "paged": mk(table.int().tolist()),
            "identity": mk([list(range(b * nb, (b + 1) * nb)) for b in range(B)]),
            "contiguous": mk([[b] for b in range(B)]),
        }
        caches = {
            "paged": (pools["k"][0], pools["v"][0]),
            "identity": (pools["k"][1].view(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM), pools["v"][1].view(B * nb, PAGE, NUM_KV_HEADS, HEAD_DIM)),
            "contiguous": (pools["k"][1], pools["v"][1]),  # [B, L, Hkv, D]: one page of L tokens each
        }
        return q, k, v, metas, caches

    scale = HEAD_DIM**-0.5
    if not args.skip_decode:
        rows, sweep = [], []
        for B, L in DECODE_SHAPES:
            q, k, v, metas, caches = decode_case(B, L)
            kv_bytes = 2 * B * L * NUM_KV_HEADS * HEAD_DIM * 2
            tbps = lambda ms: kv_bytes / ms / 1e9  # noqa: E731
            out = torch.empty_like(q)
            lse = torch.empty(B, NUM_HEADS, dtype=torch.float32, device=dev)
            row = {"batch": B, "context": L, "kv_bytes": kv_bytes,
                   "num_splits": td.choose_num_splits(B, NUM_KV_HEADS, L, td.DEFAULT_BLOCK_N, res["num_sms"])}
            ref = sdpa(SDPBackend.FLASH_ATTENTION, q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]
            for name in ("paged", "identity", "contiguous"):
                kc, vc = caches[name]
                meta = metas[name]
                td.paged_decode(q, kc, vc, meta, scale, out, lse)
                row[f"ours_{name}_rel_err_vs_flash"] = rel_err(out, ref)
                row[f"ours_{name}_TBps"] = tbps(bench(lambda: td.paged_decode(q, kc, vc, meta, scale, out, lse)))
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    q4 = q[:, :, None]
                    row[f"sdpa_{name}_TBps"] = tbps(bench(lambda: sdpa(be, q4, k, v, scale=scale, enable_gqa=True)))
                except Exception as ex:  # a backend may refuse the shape on some builds
                    row[f"sdpa_{name}_TBps"] = None
                    row[f"sdpa_{name}_error"] = f"{type(ex).__name__}: {str(ex)[:120]}"
            row["ratio_vs_flash"] = row["ours_paged_TBps"] / row["sdpa_flash_TBps"] if row["sdpa_flash_TBps"] else None
            row["ratio_vs_copy"] = row["ours_paged_TBps"] / res["copy_TBps"]
            row["paging_overhead"] = row["ours_contiguous_TBps"] / row["ours_paged_TBps"] - 1
            rows.append(row)
            print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)

            if args.sweep and (B, L) in ((16, 32768), (64, 2048), (32, 8192), (16, 2048)):
                kc, vc = caches["paged"]
                meta = metas["paged"]
                for bn, nw, ns in ((64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 4), (32, 4, 3), (128, 4, 2),
                                   (128, 4, 3), (128, 8, 3), (64, 8, 3), (16, 4, 4)):
                    base = td.choose_num_splits(B, NUM_KV_HEADS, L, bn, res["num_sms"])
                    for splits in sorted({1, max(1, base // 2), base, base * 2, base * 4}):
                        try:
                            fn = lambda: td.paged_decode(q, kc, vc, meta, scale, out, lse, num_splits=splits,  # noqa: E731
                                                         block_n=bn, num_warps=nw, num_stages=ns)
                            fn()
                            err = rel_err(out, ref)
                            r = {"batch": B, "context": L, "block_n": bn, "num_warps": nw, "num_stages": ns,
                                 "num_splits": splits, "TBps": tbps(bench(fn)), "rel_err": err}
                        except Exception as ex:
                            r = {"batch": B, "context": L, "block_n": bn, "num_warps": nw, "num_stages": ns,
                                 "num_splits": splits, "error": f"{type(ex).__name__}: {str(ex)[:160]}"}
                        sweep.append(r)
                        print("sweep", r, flush=True)
            del q, k, v, metas, caches, ref
            torch.cuda.empty_cache()
        res["decode"] = {"shape": dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype="bf16", page=PAGE),
                         "rows": rows, "sweep": sweep}

    # ---------------- prefill ----------------
    if not args.skip_prefill:
        rows, sweep = [], []
        for S in PREFILL_LENS:
            flops = 4 * NUM_HEADS * S * S * HEAD_DIM / 2
            tflops = lambda ms: flops / ms / 1e9  # noqa: E731
            q = torch.randn(1, NUM_HEADS, S, HEAD_DIM, dtype=bf16, device=dev)
            k = torch.randn_like(q)
            v = torch.randn_like(q)
            nb = S // PAGE
            table = torch.randperm(nb, device=dev)
            kc = torch.empty(nb, PAGE, NUM_HEADS, HEAD_DIM, dtype=bf16, device=dev)
            vc = torch.empty_like(kc)
            kc[table] = k[0].transpose(0, 1).reshape(nb, PAGE, NUM_HEADS, HEAD_DIM)
            vc[table] = v[0].transpose(0, 1).reshape(nb, PAGE, NUM_HEADS, HEAD_DIM)
            qt = q[0].transpose(0, 1).contiguous()  # [S, H, D]
            meta = AttentionMetadata.build([S], [0], [S], [table.int().tolist()], [-1] * S, device=dev)
            out = torch.empty_like(qt)
            lse = torch.empty(S, NUM_HEADS, dtype=torch.float32, device=dev)
            ref = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1)
            row = {"seq_len": S, "flops": flops}
            paged_prefill(qt, kc, vc, meta, scale, out, lse)
            row["ours_rel_err_vs_flash"] = rel_err(out, ref)
            row["ours_paged_TFLOPs"] = tflops(bench(lambda: paged_prefill(qt, kc, vc, meta, scale, out, lse)))
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    row[f"sdpa_{name}_TFLOPs"] = tflops(bench(lambda: sdpa(be, q, k, v, is_causal=True, scale=scale)))
                except Exception as ex:
                    row[f"sdpa_{name}_TFLOPs"] = None
                    row[f"sdpa_{name}_error"] = f"{type(ex).__name__}: {str(ex)[:120]}"
            row["ratio_vs_flash"] = row["ours_paged_TFLOPs"] / row["sdpa_flash_TFLOPs"]
            rows.append(row)
            print(row, flush=True)
            if args.sweep:
                for bm, bn, nw, ns in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2),
                                       (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                       (64, 128, 4, 3), (128, 128, 16, 2)):
                    try:
                        fn = lambda: paged_prefill(qt, kc, vc, meta, scale, out, lse, block_m=bm, block_n=bn,  # noqa: E731
                                                   num_warps=nw, num_stages=ns)
                        fn()
                        r = {"seq_len": S, "block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns,
                             "TFLOPs": tflops(bench(fn)), "rel_err": rel_err(out, ref)}
                    except Exception as ex:
                        r = {"seq_len": S, "block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns,
                             "error": f"{type(ex).__name__}: {str(ex)[:160]}"}
                    sweep.append(r)
                    print("sweep", r, flush=True)
            del q, k, v, kc, vc, qt, ref
            torch.cuda.empty_cache()
        res["prefill"] = {"shape": dict(num_heads=NUM_HEADS, num_kv_heads=NUM_HEADS, head_dim=HEAD_DIM, dtype="bf16",
                                        page=PAGE, causal=True), "rows": rows, "sweep": sweep}

    # ---------------- KV write ----------------
    rows = []
    num_blocks = 16384
    kc = torch.randn(num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
    vc = torch.randn_like(kc)
    for T in (64, 16384):
        key = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, dtype=bf16, device=dev)
        val = torch.randn_like(key)
        slots = torch.randperm(num_blocks * PAGE, device=dev)[:T]
        moved = 2 * 2 * key.numel() * 2  # K and V, read + write
        fk, fv = kc.view(-1, NUM_KV_HEADS, HEAD_DIM), vc.view(-1, NUM_KV_HEADS, HEAD_DIM)

        def torch_index_copy():
            fk.index_copy_(0, slots, key)
            fv.index_copy_(0, slots, val)

        row = {"tokens": T, "bytes": moved}
        for name, fn in (("triton", lambda: write_kv(kc, vc, key, val, slots)), ("torch_index_copy", torch_index_copy),
                         ("torch_ref_with_host_filter", lambda: write_kv_torch(kc, vc, key, val, slots))):
            ms = bench(fn)
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_TBps"] = moved / ms / 1e9
        rows.append(row)
        print(row, flush=True)
    res["kv_write"] = {"shape": dict(num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, page=PAGE, dtype="bf16"), "rows": rows}
    return res


def plot(res: dict, out_dir: str) -> None:
    if "decode" not in res:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["decode"]["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), sharey=True)
    series = (("ours_paged_TBps", "fapool Triton, 16-token pages (random)", "C0", "-o"),
              ("ours_contiguous_TBps", "fapool Triton, contiguous KV", "C0", "--s"),
              ("sdpa_flash_TBps", "SDPA flash, contiguous", "C1", "-^"),
              ("sdpa_cudnn_TBps", "SDPA cuDNN, contiguous", "C2", "-v"))
    for ax, B in zip(axes, batches):
        rs = sorted((r for r in rows if r["batch"] == B), key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        for key, label, color, style in series:
            ys = [r.get(key) for r in rs]
            if any(y is not None for y in ys):
                ax.plot(ctx, ys, style, color=color, label=label)
        ax.axhline(res["copy_TBps"], color="gray", ls=":", label=f"device copy {res['copy_TBps']:.2f} TB/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [f"{c // 1024}K" for c in ctx])
        ax.set_title(f"decode, batch {B}")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("effective KV bandwidth (TB/s)")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"GQA 32/8, head dim 128, bf16 — {res['gpu']}, {res['date'][:10]}, {res['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernels_decode_bandwidth.png")
    fig.savefig(path, dpi=120)
    print("wrote", path)


def summary(res: dict) -> None:
    print(f"\n{res['gpu']}  copy {res['copy_TBps']:.2f} TB/s  commit {res['commit'][:10]}")
    if "decode" in res:
        print("decode B   L      paged  ident  contig flash  cudnn  x_flash x_copy paging splits")
        for r in res["decode"]["rows"]:
            f = lambda k: f"{r[k]:6.2f}" if r.get(k) is not None else "   n/a"  # noqa: E731
            print(f"      {r['batch']:<3} {r['context']:<6} {f('ours_paged_TBps')} {f('ours_identity_TBps')} "
                  f"{f('ours_contiguous_TBps')} {f('sdpa_flash_TBps')} {f('sdpa_cudnn_TBps')}  "
                  f"{r['ratio_vs_flash']:.3f}   {r['ratio_vs_copy']:.3f}  {r['paging_overhead']:+.3f} {r['num_splits']}")
    if "prefill" in res:
        print("prefill S      ours   flash  cudnn  x_flash  rel_err")
        for r in res["prefill"]["rows"]:
            print(f"        {r['seq_len']:<6} {r['ours_paged_TFLOPs']:6.1f} {r['sdpa_flash_TFLOPs'] or 0:6.1f} "
                  f"{r['sdpa_cudnn_TFLOPs'] or 0:6.1f}  {r['ratio_vs_flash']:.3f}   {r['ours_rel_err_vs_flash']:.1e}")
    for r in res.get("kv_write", {}).get("rows", []):
        print(f"kv_write T={r['tokens']:<6} triton {r['triton_us']:.1f} us  index_copy {r['torch_index_copy_us']:.1f} us  "
              f"ref+filter {r['torch_ref_with_host_filter_us']:.1f} us")


if __name__ == "__main__":
    main()
