"""GPU: the block-score pass of sparse selection (fapool.sparse.triton_select, stage 1) over its
tile size and warp count, at the benchmark shape (Hq 32, Hkv 8, D 128, bf16, block 16): time per
layer (triton do_bench, L2 flushed, median) and the bandwidth it streams the key summaries at.
Then the whole selection (scores + stage 2) with each of stage 2's threshold searches (one sort,
one bit a pass), also at SmolLM2's shape (Hq 9, Hkv 3, D 64), budgets of a quarter of the blocks:
eager (launch overhead included) and in a CUDA graph.

    python3 benchmarks/sparse_score_sweep.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def main() -> int:
    import torch
    import triton

    import fapool.sparse.triton_select as ts
    from fapool.bench.results import environment
    from sparse_gpu import BS, Timer, make_layer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    ap.add_argument("--cases", default="8x32768,16x32768,8x8192")
    ap.add_argument("--tiles", default="32,64,128,256")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--select-cases", default="llamax8x32768,llamax16x32768,llamax8x8192,smollm2x8x8192,smollm2x8x4096")
    ns = ap.parse_args()
    rows = []
    for case in ns.cases.split(","):
        batch, ctx = (int(x) for x in case.split("x"))
        L = make_layer(batch, ctx, 1, "cuda", torch.bfloat16)
        summary_bytes = 2 * L.kmin[L.tables.long()].numel() * L.kmin.element_size()
        ref = None
        for tile in (int(x) for x in ns.tiles.split(",")):
            for warps in (int(x) for x in ns.warps.split(",")):
                ts.SCORE_TILE, ts.SCORE_WARPS = tile, warps
                fn = lambda: ts.block_scores_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, BS)  # noqa: E731
                out = fn()
                ref = out if ref is None else ref
                us = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
                rows.append({
                    "batch": batch, "context": ctx, "tile": tile, "warps": warps, "us": round(us, 2),
                    "summary_TBps": round(summary_bytes / us / 1e6, 3), "equal_to_first": bool(torch.equal(out, ref)),
                })
                print(rows[-1], flush=True)
    ts.SCORE_TILE, ts.SCORE_WARPS = 64, 4
    searches = {"sort": 1 << 30, "1bit": 0}  # SORT_MAX_ROW
    timer = Timer(False, 10, 50)
    select_rows = []
    for case in ns.select_cases.split(","):
        heads, batch, ctx = case.split("x")
        hq, hkv, d = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}[heads]
        L = make_layer(int(batch), int(ctx), 1, "cuda", torch.bfloat16, hq=hq, hkv=hkv, d=d)
        budgets = torch.full((hkv,), 0.25, dtype=torch.float64, device="cuda")
        first = None
        for name, sort_max in searches.items():
            ts.SORT_MAX_ROW = sort_max
            fn = lambda: ts.select_blocks_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, budgets, BS)  # noqa: E731
            out = fn()
            first = out if first is None else first
            us = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
            select_rows.append({
                "shape": f"Hq {hq}, Hkv {hkv}, D {d}", "batch": int(batch), "context": int(ctx), "search": name,
                "select_us": round(us, 2), "select_graph_us": round(timer.graph(fn), 2),
                "equal_to_first": bool(torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])),
            })
            print(select_rows[-1], flush=True)
    res = {"bench": "sparse_score_sweep", "env": environment("cuda"), "shape": "Hq 32, Hkv 8, D 128, bf16, block 16",
           "timing": "triton do_bench (L2 flushed), median, one layer, eager", "rows": rows,
           "select_rows": select_rows}
    os.makedirs(ns.out_dir, exist_ok=True)
    path = os.path.join(ns.out_dir, f"sparse_score_sweep-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
