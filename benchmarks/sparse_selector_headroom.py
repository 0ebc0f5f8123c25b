"""How far the runtime block selector is from an oracle (seed 003's budgets), on real text.

The same windows of the calibration split are measured twice: with the selector the sparse
backend runs (sink + recent + best key min/max bounds) and with an oracle that ranks each KV
head's blocks by their true attention mass (no summary-based selector can know it). For each
target recall: the mean KV-head budget each needs per context bin. The oracle's budget is the
floor for any top-k block selector on this model: if it is high, the model's attention is
diffuse and no better summary makes sparse decode cheap at that recall.

    PYTHONPATH=. python benchmarks/sparse_selector_headroom.py [--device cuda --windows 8 --length 8192]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fapool


def main(argv: list[str] | None = None) -> int:
    import torch

    from fapool.attention.torch_ref import TorchReferenceBackend
    from fapool.bench.results import environment, write_result
    from fapool.sparse.calibrate import DEFAULT_GRID, build_profile, calibrate, length_bins, load_model
    from fapool.sparse.corpus import CORPUS_PACKAGE, token_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--min-pos", type=int, default=512)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--targets", default="0.95,0.98,0.99")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model, tokenizer, src = load_model(ns.model, TorchReferenceBackend(), ns.device)
    windows, names = token_windows(tokenizer, "calibration", ns.windows, ns.length, with_names=True)
    bins = length_bins(ns.min_pos, ns.length)
    kv_heads = model.model.layers[0].self_attn.num_kv_heads
    targets = [float(t) for t in ns.targets.split(",")]
    rows: dict = {}
    for selector in ("bound", "oracle"):
        t0 = time.perf_counter()
        curves = calibrate(
            model, windows, 16, DEFAULT_GRID, 4, ns.min_pos, ns.stride, bins=bins, device=ns.device, selector=selector
        )
        rows[selector] = {"seconds": round(time.perf_counter() - t0, 1)}
        for t in targets:
            p = build_profile(curves, DEFAULT_GRID, t, kv_heads, 16, 4, src.path, {})
            rows[selector][f"{t:g}"] = {"lengths": p.lengths, "mean_budget_by_length": p.calibration["mean_budget_by_length"]}
        print(selector, rows[selector], flush=True)
    payload = {
        "env": environment(ns.device),
        "model": src.path,
        "corpus": f"{CORPUS_PACKAGE} calibration split: " + ", ".join(names),
        "shapes": {"windows": ns.windows, "length": ns.length, "min_pos": ns.min_pos, "stride": ns.stride, "bins": bins,
                   "block_size": 16, "min_blocks": 4},
        "selectors": rows,
    }
    summary = "mean KV-head budget per context bin, runtime bound selector vs oracle (true block mass): " + "; ".join(
        f"recall {t:g}: bound {rows['bound'][f'{t:g}']['mean_budget_by_length']} vs oracle "
        f"{rows['oracle'][f'{t:g}']['mean_budget_by_length']}"
        for t in targets
    ) + f" at contexts {[round(x) for x in rows['bound'][f'{targets[0]:g}']['lengths']]}"
    print(write_result("sparse_selector_headroom", payload, summary, out_dir=ns.out_dir))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
