"""`fapool calibrate-heads`: per-head sparse attention budgets for a model (seed 003)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-heads", help="measure per-head attention sparsity on real text; write a sparse profile"
    )
    p.add_argument(
        "--model", default=None, help="HF folder, .gguf file or preset (default: embedded SmolLM2)"
    )
    p.add_argument("--windows", type=int, default=8, help="text windows (one per play)")
    p.add_argument("--length", type=int, default=2048, help="tokens per window")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--min-blocks", type=int, default=4, help="never fewer blocks than this per head")
    p.add_argument("--min-pos", type=int, default=256, help="first query position measured")
    p.add_argument("--stride", type=int, default=8, help="measure every stride-th query position")
    p.add_argument(
        "--bins",
        default=None,
        help="context-length bin edges in tokens, e.g. 512,1024,2048,4096 (default: doubling from "
        "--min-pos below --length); budgets are chosen per bin and interpolated in the length",
    )
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument(
        "--out",
        default=None,
        help="profile JSON (default: ~/.cache/fapool/sparse/<model>-recall<target>.json)",
    )
    p.add_argument("--plot", default=None, help="heatmap PNG (default: next to the profile)")
    p.set_defaults(func=cmd_calibrate_heads)


def cmd_calibrate_heads(ns: argparse.Namespace) -> int:
    from fapool.sparse.calibrate import run_calibration

    if not 0.0 < ns.target_recall <= 1.0:
        raise ValueError(f"--target-recall must be in (0, 1], got {ns.target_recall}")
    bins = [int(b) for b in ns.bins.split(",")] if ns.bins else None
    profile, out, plot = run_calibration(
        ns.model,
        ns.windows,
        ns.length,
        ns.block_size,
        ns.target_recall,
        ns.min_blocks,
        ns.min_pos,
        ns.stride,
        ns.out,
        ns.plot,
        bins,
        ns.device,
    )
    print(
        json.dumps(
            {
                "profile": out,
                "plot": plot,
                # For a length rule: at the shortest calibrated length (the rest: mean_budget_by_length)
                "mean_budget": round(profile.mean_budget, 4),
                "lengths": profile.lengths,
                "kv_budget_min_max": [min(map(min, profile.kv_budget)), max(map(max, profile.kv_budget))],
                **{k: v for k, v in profile.calibration.items() if k != "plays"},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="fapool")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
