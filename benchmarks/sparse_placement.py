"""Head-parallel load balance with head-adaptive budgets (S-HPLB), from a calibrated profile.

A head's attention work is taken as proportional to its budget (the blocks it reads). For each
worker count, per-layer and global (one placement for all layers, the placement hook's mode)
placements by contiguous count split, budget-weighted LPT and the exact optimum are scored by
    max_over_mean = sum over layers of the busiest worker's load / sum of the mean loads
(1.0: no bubbles; the layer barrier makes the busiest worker the layer's time). In global mode
"optimal" minimises the busiest worker of the summed weights, which is not the per-layer
objective, so LPT can beat it there; per layer it is the true optimum.
KV-head granularity is what GQA kernels schedule (SmolLM2: 3 KV heads, so 2-3 workers); the
query-head rows (9 heads, needs from head_need) stand in for an MHA model of the same
heterogeneity, to cover 2-8 workers.

    python benchmarks/sparse_placement.py --profile benchmarks/results/sparse_profile-smollm2.json
"""

from __future__ import annotations

import argparse

from fapool.bench.results import environment, write_result
from fapool.sparse.placement import balance_report
from fapool.sparse.profile import SparseProfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    p = SparseProfile.load(args.profile)
    cases = {
        "kv_heads": (p.kv_budget, range(2, p.num_kv_heads + 1)),
        "query_heads": (p.head_need, range(2, min(8, p.num_heads) + 1)),
    }
    rows = []
    for gran, (budgets, worker_counts) in cases.items():
        for workers in worker_counts:
            for per_layer in (True, False):
                rep = balance_report(budgets, workers, per_layer)
                row = {"granularity": gran, "workers": workers, "per_layer": per_layer, **rep}
                rows.append(row)
                print(
                    f"{gran:11s} workers {workers} {'per-layer' if per_layer else 'global   '}  "
                    + "  ".join(f"{k} {v['max_over_mean']:.3f}" for k, v in rep.items())
                )
    payload = {
        "env": environment("cpu"),
        "profile": args.profile,
        "mean_budget": p.mean_budget,
        "results": rows,
    }
    pick = lambda g, w: next(
        r for r in rows if r["granularity"] == g and r["workers"] == w and r["per_layer"]
    )
    parts = []
    for g, w in (("kv_heads", 2), ("query_heads", 4), ("query_heads", 8)):
        if any(r["granularity"] == g and r["workers"] == w for r in rows):
            r = pick(g, w)
            parts.append(
                f"{g} x{w} workers: max/mean contiguous {r['contiguous']['max_over_mean']:.3f}, "
                f"LPT {r['lpt']['max_over_mean']:.3f}"
                + (f", optimal {r['optimal']['max_over_mean']:.3f}" if "optimal" in r else "")
            )
    summary = "S-HPLB per-layer head placement by budget (SmolLM2 profile): " + "; ".join(parts)
    if not args.no_write:
        print(write_result("sparse_placement", payload, summary))
    print(summary)


if __name__ == "__main__":
    main()
