"""fapool's paged decode kernel under forced split counts and tile settings, beside FlashInfer's
tensor-core decode, on the very same pages (GQA 32/8, d128, bf16, 16-token pages scattered in a
pool), timed as the engine runs it: CUDA-graph replays of 20 calls back to back.

It reuses the shared peer harness (`peer_kernels.py` of ../shared/bench, ANCHORS.md) for the data,
the timing and FlashInfer's loading, so its figures line up with that harness's table.

    PEER_HARNESS=/path/to/dir/of/peer_kernels.py python benchmarks/decode_peer_sweep.py \
        --shapes 32x2048,32x16384 --out $OUT/decode_peer_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SPLITS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
CONFIGS = ((64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2), (128, 8, 2))  # block_n, warps, stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="32x2048,32x16384,16x2048,8x8192,64x8192,16x32768")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, os.environ["PEER_HARNESS"])
    import peer_kernels as pk
    import torch

    res: dict = {"gpu": torch.cuda.get_device_name(0), "commit": os.environ.get("FAPOOL_COMMIT", "?"), "rows": []}
    fi: dict = {}
    have_fi = "prefill_fa2" in pk.fi_load(fi)
    res["flashinfer"] = fi
    for shape in args.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        res["rows"].append(sweep_shape(pk, torch, b, n, have_fi))
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def sweep_shape(pk, torch, b: int, n: int, have_fi: bool) -> dict:
    """One (batch, context) shape: FI-TC, fapool's default, then every forced setting."""
    from fapool.attention.metadata import AttentionMetadata
    from fapool.attention.triton_decode import auto_num_splits, paged_decode

    scale = 1.0 / math.sqrt(pk.D)
    case = pk.make_case(torch, b, n, "cuda", 1000 + b * 7 + n)
    kv_bytes = b * n * pk.HKV * pk.D * 2 * 2
    ref = pk.k_sdpa(torch, case, "flash")()
    i32 = torch.full((b,), 0, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        query_start_loc=case["cu_q"], query_pos_start=i32 + (n - 1), kv_lens=i32 + n, kv_start=i32,
        block_tables=case["block_table"], slot_mapping=torch.zeros(b, dtype=torch.int64, device="cuda"),
        max_query_len=1, max_kv_len=n, query_lens_cpu=[1] * b, kv_lens_cpu=[n] * b,
    )
    q, kp, vp = case["q"], case["k_pool"], case["v_pool"]
    out = torch.empty_like(q)
    lse = torch.empty(b, pk.HQ, dtype=torch.float32, device="cuda")
    row = {"B": b, "L": n, "kv_bytes": kv_bytes, "variants": [],
           "auto_splits": auto_num_splits(b, pk.HKV, n, pk.D, 2, torch.device("cuda"))}

    def timed(name, fn, **info):
        o = fn()
        torch.cuda.synchronize()
        err = (o.float() - ref.float()).abs().max().item()
        t = pk.time_graph(torch, fn)
        row["variants"].append({"name": name, "graph_us": t, "TBps": kv_bytes / t / 1e6, "max_abs_err": err, **info})

    def forced(bn, nw, ns, sp):
        return lambda: paged_decode(q, kp, vp, meta, scale, out, lse, num_splits=sp, block_n=bn, num_warps=nw,
                                    num_stages=ns)[0]

    if have_fi:
        timed("fi_tc", pk.k_flashinfer(torch, case, True))
    timed("fapool_auto", lambda: paged_decode(q, kp, vp, meta, scale, out, lse)[0])
    for bn, nw, ns in CONFIGS:
        for sp in SPLITS:
            if sp > n // bn:
                continue
            try:
                timed("fapool", forced(bn, nw, ns, sp), block_n=bn, num_warps=nw, num_stages=ns, splits=sp)
            except Exception as ex:  # noqa: BLE001 - a setting that does not compile (shared memory)
                row["variants"].append({"name": "fapool", "block_n": bn, "num_warps": nw, "num_stages": ns,
                                        "splits": sp, "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
    if have_fi:
        timed("fi_tc_again", pk.k_flashinfer(torch, case, True))
    ok = [v for v in row["variants"] if v["name"] == "fapool" and "graph_us" in v and v["max_abs_err"] < 2e-2]
    best = row["best"] = min(ok, key=lambda v: v["graph_us"])
    by = {v["name"]: v for v in row["variants"]}
    fi_us = min(by["fi_tc"]["graph_us"], by["fi_tc_again"]["graph_us"]) if have_fi else float("nan")
    auto_us = by["fapool_auto"]["graph_us"]
    print(f"B{b} x {n}: auto ({row['auto_splits']} splits) {auto_us:.1f} us, best {best['graph_us']:.1f} us "
          f"(bn {best['block_n']} w {best['num_warps']} s {best['num_stages']} splits {best['splits']}), "
          f"FI-TC {fi_us:.1f} us; auto x{fi_us / auto_us:.3f} FI, best x{fi_us / best['graph_us']:.3f}", flush=True)
    return row

if __name__ == "__main__":
    main()
