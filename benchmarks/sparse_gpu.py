"""GPU: the Triton sparse decode kernel against the torch reference, and its latency against the
dense paged decode kernel at 8K / 16K / 32K context (seed 003).

Shape: one attention layer of a Llama-3-8B-like model (32 query heads, 8 KV heads, head dim
128, bf16, block 16), `--batch` decode sequences. Per-head budgets come from the calibrated
profile: the KV heads of benchmark layer l take the needs of SmolLM2's query heads 0-7 in layer
l (head_need), so the heterogeneity is the measured one; "uniform" gives every head the mean.

    python benchmarks/sparse_gpu.py --profile benchmarks/results/sparse_profile-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from fapool.attention.metadata import AttentionMetadata
from fapool.attention.sparse import SparseAttentionBackend
from fapool.attention.torch_ref import TorchReferenceBackend
from fapool.attention.triton_decode import paged_decode
from fapool.sparse.profile import SparseProfile
from fapool.sparse.selection import budget_blocks
from fapool.sparse.triton_sparse_decode import select_blocks, select_blocks_fused, sparse_paged_decode

BS = 16


def make_case(batch, ctx, hq, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = math.ceil(ctx / BS)
    total = batch * nb
    k = torch.randn(total, BS, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(total, BS, hkv, d, device="cuda", dtype=dtype, generator=g)
    # a few "heavy" keys, so selection matters: scale random blocks up
    heavy = torch.rand(total, 1, hkv, 1, device="cuda", generator=g) < 0.05
    k = torch.where(heavy, k * 3, k)
    perm = torch.randperm(total, device="cuda", generator=g).to(torch.int32)
    tables = perm.view(batch, nb)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype, generator=g)
    kmin = k.amin(1)
    kmax = k.amax(1)
    meta = AttentionMetadata.build(
        query_lens=[1] * batch,
        query_pos_start=[ctx - 1] * batch,
        kv_lens=[ctx] * batch,
        block_tables=tables.tolist(),
        slot_mapping=[0] * batch,
        device="cuda",
    )
    return q, k, v, kmin, kmax, tables, meta


def check():
    """Kernel + GPU selection vs the torch reference sparse path (same budgets)."""
    worst = 0.0
    worst_sel = [1.0]
    for ctx, hq, hkv in ((1000, 8, 2), (3001, 32, 8)):
        q, k, v, kmin, kmax, tables, meta = make_case(3, ctx, hq, hkv, 64, torch.bfloat16, seed=ctx)
        nb = math.ceil(ctx / BS)
        fr = torch.tensor([0.1, 0.3, 0.05, 0.5, 0.2, 0.15, 0.25, 0.4][:hkv], dtype=torch.float64)
        budgets = budget_blocks(fr, nb, 4).to("cuda").expand(3, -1).contiguous()
        n_kv = torch.full((3,), ctx, device="cuda")
        pages, lens = select_blocks(q, kmin, kmax, tables, n_kv, budgets, BS)
        fp, fl_ = select_blocks_fused(q, kmin, kmax, tables, n_kv, budgets, BS, nb, int(budgets.max()))
        same = float((fp == pages).float().mean())
        print("fused selection agreement", same, bool(torch.equal(fl_, lens)), flush=True)
        worst_sel[0] = min(worst_sel[0], same)
        out, lse = sparse_paged_decode(q, k, v, pages, lens, 64**-0.5)
        ref = SparseAttentionBackend(TorchReferenceBackend(), fr.tolist())
        ref.kmin, ref.kmax = kmin, kmax
        ro, rl = ref.sparse_decode(q, k, v, tables, n_kv, budgets, 64**-0.5)
        worst = max(worst, float((out.float() - ro).abs().max()), float((lse - rl).abs().max()))
        # full budget == dense kernel
        full = torch.full_like(budgets, nb)
        pages, lens = select_blocks(q, kmin, kmax, tables, n_kv, full, BS)
        fo, fl = sparse_paged_decode(q, k, v, pages, lens, 64**-0.5)
        do, dl = paged_decode(q, k, v, meta, 64**-0.5)
        worst = max(worst, float((fo.float() - do.float()).abs().max()), float((fl - dl).abs().max()))
    return worst, worst_sel[0]


def bench(fn, *args):
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), warmup=10, rep=40) * 1e3  # us


def select_and_decode(q, k, v, kmin, kmax, tables, n_kv, budgets, scale, n_max, k_top):
    pages, lens = select_blocks_fused(q, kmin, kmax, tables, n_kv, budgets, BS, n_max, k_top)
    return sparse_paged_decode(q, k, v, pages, lens, scale, num_splits=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    profile = SparseProfile.load(args.profile)
    res = {
        "device": torch.cuda.get_device_name(),
        "batch": args.batch,
        "shape": "Hq 32, Hkv 8, D 128, bf16, block 16",
    }
    res["max_abs_err_vs_torch_ref"], res["fused_selection_agreement"] = check()
    print("check", res["max_abs_err_vs_torch_ref"], flush=True)
    hq, hkv, d = 32, 8, 128
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        q, k, v, kmin, kmax, tables, meta = make_case(args.batch, ctx, hq, hkv, d, torch.bfloat16)
        nb = math.ceil(ctx / BS)
        n_kv = torch.full((args.batch,), ctx, device="cuda")
        t_dense = bench(paged_decode, q, k, v, meta, d**-0.5)
        acc = {
            "adaptive_kernel": 0.0,
            "adaptive_total": 0.0,
            "uniform_kernel": 0.0,
            "uniform_total": 0.0,
            "select": 0.0,
        }
        frac_sum = 0.0
        for layer in layers:
            need = torch.tensor(profile.head_need[layer][:hkv], dtype=torch.float64)
            for name, fr in (("adaptive", need), ("uniform", torch.full_like(need, float(need.mean())))):
                budgets = (
                    budget_blocks(fr, nb, profile.min_blocks).to("cuda").expand(args.batch, -1).contiguous()
                )
                pages, lens = select_blocks(q, kmin, kmax, tables, n_kv, budgets, BS)
                acc[f"{name}_kernel"] += bench(sparse_paged_decode, q, k, v, pages, lens, d**-0.5)
                acc[f"{name}_total"] += bench(
                    select_and_decode,
                    q,
                    k,
                    v,
                    kmin,
                    kmax,
                    tables,
                    n_kv,
                    budgets,
                    d**-0.5,
                    nb,
                    int(budgets.max()),
                )
                if name == "adaptive":
                    acc["select"] += bench(
                        select_blocks_fused, q, kmin, kmax, tables, n_kv, budgets, BS, nb, int(budgets.max())
                    )
                    frac_sum += float(budgets.float().mean()) / nb
        row = {"context": ctx, "dense_us": round(t_dense, 1), "mean_budget": round(frac_sum / len(layers), 4)}
        for key, val in acc.items():
            row[f"{key}_us"] = round(val / len(layers), 1)
        for f in (0.125, 0.25, 0.5):  # fixed budgets, for the speedup-vs-budget curve
            budgets = budget_blocks(torch.full((hkv,), f, dtype=torch.float64), nb, 4)
            budgets = budgets.to("cuda").expand(args.batch, -1).contiguous()
            row[f"uniform{f:g}_total_us"] = round(
                bench(
                    select_and_decode,
                    q,
                    k,
                    v,
                    kmin,
                    kmax,
                    tables,
                    n_kv,
                    budgets,
                    d**-0.5,
                    nb,
                    int(budgets.max()),
                ),
                1,
            )
        row["speedup_kernel"] = round(t_dense / row["adaptive_kernel_us"], 3)
        row["speedup_total"] = round(t_dense / row["adaptive_total_us"], 3)
        rows.append(row)
        print(row, flush=True)
    res["results"] = rows
    with open(os.path.join(args.out, "sparse_gpu.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
