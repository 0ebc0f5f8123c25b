"""GPU, one command: sparse decode (seed 003, S-HPLB) against our dense paged decode.

    python3 benchmarks/sparse_gpu.py --out-dir $OUT          # under ~3 min on an H100/H200

Shape: attention layers of a Llama-3-8B-like model (32 query heads, 8 KV heads, head dim 128,
bf16, block 16), `--batches` decode sequences at `--contexts` tokens. Every benchmark layer has
its own K/V, summaries and block tables, and a timed call runs all `--layers` layers in a row
(figures are per layer): a real decode step reads a different cache per layer, so nothing of
one layer's KV or summaries is still in L2 for the next. L2 is also flushed before every timed
call (triton do_bench, median).

Per-head budgets: the KV heads of benchmark layer l take the needs of SmolLM2's query heads
0-7 in layer l (profile head_need), so the heterogeneity is the measured one; "uniform" gives
every head of a layer that layer's mean (same total). Budgets are fractions turned into blocks
inside the selection kernel (budget_blocks), as a decode step would do every step.

Parts (each recorded on its own; a failure is written to "errors" and the rest still runs):
  check      Triton selection == torch reference exactly on integer-valued data (exact scores,
             many ties); agreement on random data; select + decode vs the torch sparse path;
             full budget vs dense; CUDA-graph replay == eager.
  latency    per (batch, context): dense; sparse kernel only / selection only / selection +
             kernel, adaptive and uniform, in CUDA graphs (and eager for some), with the
             work-balanced kernel (fapool.sparse.triton_balanced_decode); the previous
             torch-topk selection for comparison; a sweep of mean budgets (uniform and the
             adaptive profile scaled) and the budget that would reach the 2.88x target; the
             balanced kernel's grid at 0.5/1/2/4 waves.
  engine     decode TPOT of the engine on SmolLM2-135M's shape (random bf16 weights), batch
             --engine-batch at --engine-contexts: dense vs the profile's adaptive budgets vs
             uniform of the same total (all sparse at every step), and the adaptive budgets with
             the engine's default gate (dense below --sparse-min-context); GPU time of the step's
             graph and its attention kernels.
  placement  head-parallel attention simulated on one GPU: for 2/4/8 workers the KV heads are
             split contiguously or by LPT on budget weights (fapool.sparse.placement), each
             worker's share (its heads' KV, selection + kernel) timed per layer; a layer takes
             its slowest worker. Max worker vs the mean (the ideal), summed over layers.

Writes sparse_gpu-<UTC time>.json into --out-dir (default $OUT, else benchmarks/results) and
prints a table. --dry-run runs every code path on tiny shapes on the CPU through Triton's
interpreter (TRITON_INTERPRET=1), timings meaningless, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

from fapool.config import DEFAULT_SPARSE_MIN_CONTEXT  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
TARGET = 2.88  # the seed's attention-latency reduction


@dataclass
class Layer:
    """One attention layer's decode inputs: its own paged KV, summaries and tables."""

    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [num_blocks, BS, Hkv, D]
    v: torch.Tensor
    kmin: torch.Tensor  # [num_blocks, Hkv, D]
    kmax: torch.Tensor
    tables: torch.Tensor  # [B, nb] int32
    n_kv: torch.Tensor  # [B] int32
    meta: object  # AttentionMetadata for the dense kernel

    def heads(self, kv_heads: list[int]) -> Layer:
        """The share of a head-parallel worker that holds `kv_heads`: its own (copied) caches."""
        idx = torch.tensor(kv_heads, device=self.q.device)
        group = self.q.shape[1] // self.k.shape[2]
        qh = (idx[:, None] * group + torch.arange(group, device=idx.device)).flatten()
        return Layer(
            self.q[:, qh].contiguous(),
            self.k[:, :, idx].contiguous(),
            self.v[:, :, idx].contiguous(),
            self.kmin[:, idx].contiguous(),
            self.kmax[:, idx].contiguous(),
            self.tables,
            self.n_kv,
            self.meta,
        )


def make_layer(batch, ctx, seed, device, dtype, hq=HQ, hkv=HKV, d=D, integer=False):
    from fapool.attention.metadata import AttentionMetadata

    g = torch.Generator(device=device).manual_seed(seed)
    nb = math.ceil(ctx / BS)
    total = batch * nb
    if integer:  # exact block scores in any summation order (selection checked exactly)
        k = torch.randint(-3, 4, (total, BS, hkv, d), device=device, generator=g).to(dtype)
        q = torch.randint(-2, 3, (batch, hq, d), device=device, generator=g).to(dtype)
    else:
        k = torch.randn(total, BS, hkv, d, device=device, dtype=dtype, generator=g)
        q = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=g)
        heavy = torch.rand(total, 1, hkv, 1, device=device, generator=g) < 0.05  # blocks worth picking
        k = torch.where(heavy, k * 3, k)
    v = torch.randn(total, BS, hkv, d, device=device, dtype=dtype, generator=g)
    tables = torch.randperm(total, device=device, generator=g).to(torch.int32).view(batch, nb)
    meta = AttentionMetadata.build(
        query_lens=[1] * batch,
        query_pos_start=[ctx - 1] * batch,
        kv_lens=[ctx] * batch,
        block_tables=tables.tolist(),
        slot_mapping=[0] * batch,
        device=device,
    )
    n_kv = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    return Layer(q, k, v, k.amin(1), k.amax(1), tables, n_kv, meta)


class Timer:
    """CUDA graphs and triton do_bench (L2 flushed, median) on a GPU; one plain call in dry runs."""

    def __init__(self, dry: bool, warmup_ms: int, rep_ms: int) -> None:
        self.dry, self.warmup_ms, self.rep_ms = dry, warmup_ms, rep_ms

    def eager(self, fn) -> float:
        if self.dry:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e3

    def graph(self, fn) -> float:
        """fn captured once in a CUDA graph (after a warm-up call that compiles), replays timed."""
        if self.dry:
            return self.eager(fn)
        fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        try:
            return self.eager(graph.replay)
        finally:
            del graph


# --- the operations timed ---------------------------------------------------------------------


def dense_step(layers):
    from fapool.attention.triton_decode import paged_decode

    for L in layers:
        paged_decode(L.q, L.k, L.v, L.meta, L.q.shape[-1] ** -0.5)


def select_step(layers, fracs, max_pages, min_blocks):
    from fapool.sparse.triton_select import select_blocks_triton

    return [
        select_blocks_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, f, BS, m, min_blocks)
        for L, f, m in zip(layers, fracs, max_pages)
    ]


def score_step(layers):
    """Selection stage 1 alone (the per-block bounds), to split the selection's time."""
    from fapool.sparse.triton_select import block_scores_triton

    for L in layers:
        block_scores_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, BS)


def kernel_step(layers, selections, num_programs=None):
    """The work-balanced sparse decode kernel over given selections."""
    from fapool.sparse.triton_balanced_decode import balanced_sparse_decode

    for L, (pages, lens) in zip(layers, selections):
        balanced_sparse_decode(L.q, L.k, L.v, pages, lens, L.q.shape[-1] ** -0.5, num_programs)


def total_step(layers, fracs, max_pages, min_blocks, num_programs=None):
    kernel_step(layers, select_step(layers, fracs, max_pages, min_blocks), num_programs)


def legacy_select_step(layers, budgets, n_max, k_top):
    """The previous selection (commit 833c901): Triton scores, then torch topk / sort / gather;
    no host sync either, but ~15 eager launches incl. topk and a segmented sort."""
    from fapool.sparse.triton_select import block_scores_triton

    for L, b, k in zip(layers, budgets, k_top):
        score = block_scores_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, BS)
        nb = ((L.n_kv + BS - 1) // BS).view(-1, 1, 1)
        idx = torch.arange(n_max, device=score.device)
        score = torch.where((idx == 0) | (idx == nb - 1), float("inf"), score)
        score = torch.where(idx >= nb, float("-inf"), score)
        top = torch.topk(score, k, dim=-1).indices
        chosen = torch.arange(k, device=score.device) < b[..., None]
        top = torch.where(chosen, top, n_max).sort(dim=-1).values.clamp(max=n_max - 1)
        L.tables.gather(1, top.flatten(1)).view_as(top)
        ((b - 1) * BS + (L.n_kv - (nb.view(-1) - 1) * BS).view(-1, 1)).to(torch.int32)


# --- budgets ----------------------------------------------------------------------------------


def layer_fracs(profile, layers: list[int], hkv: int, ctx: int) -> list[list[float]]:
    """Adaptive budgets of the benchmark layers at `ctx` tokens: KV head h of layer l <- need of
    query head h (for a length-rule profile, its rule's share at ctx; past the longest
    calibrated length that is the rule's extrapolation)."""
    need = profile.fractions_at(ctx, query_heads=True) if profile.lengths else profile.head_need
    return [[float(x) for x in need[layer][:hkv]] for layer in layers]


def kv_fracs(profile, layers: list[int], ctx: int) -> list[list[float]]:
    table = profile.fractions_at(ctx) if profile.lengths else profile.kv_budget
    return [[float(x) for x in table[layer]] for layer in layers]


def scaled(fracs: list[list[float]], mean: float) -> list[list[float]]:
    """The adaptive profile scaled to a mean budget (clipped to 1; the realised mean is reported)."""
    cur = sum(map(sum, fracs)) / sum(map(len, fracs))
    return [[min(1.0, f * mean / cur) for f in row] for row in fracs]


def blocks_of(fracs, nb, min_blocks):
    from fapool.sparse.selection import budget_blocks

    return [budget_blocks(torch.tensor(row, dtype=torch.float64), nb, min_blocks) for row in fracs]


def realised_mean(fracs, nb, min_blocks) -> float:
    blocks = blocks_of(fracs, nb, min_blocks)
    return float(torch.stack(blocks).double().mean()) / nb


# --- parts ------------------------------------------------------------------------------------


def chosen_set(pages: torch.Tensor, budgets: torch.Tensor) -> set[tuple[int, int, int]]:
    """{(seq, kv head, page)} of a selection (the first budget entries of each row)."""
    p, b = pages.cpu().tolist(), budgets.cpu().tolist()
    return {(s, h, x) for s in range(len(p)) for h in range(len(p[s])) for x in p[s][h][: b[s][h]]}


def guarded(errors: dict, key: str, fn):
    """fn() or None, with the error kept: one failed measurement must not lose the part."""
    try:
        return fn()
    except Exception as e:
        errors[key] = f"{type(e).__name__}: {e}"
        print(f"  [{key}] FAILED: {type(e).__name__}: {e}", flush=True)
        return None


def part_check(cfg) -> dict:
    from fapool.attention.sparse import SparseAttentionBackend
    from fapool.attention.torch_ref import TorchReferenceBackend
    from fapool.attention.triton_decode import paged_decode
    from fapool.sparse.selection import budget_blocks_batched, select_blocks_torch
    from fapool.sparse.triton_balanced_decode import balanced_sparse_decode
    from fapool.sparse.triton_select import select_blocks_triton

    dev, dt_ = cfg.device, cfg.dtype
    out: dict = {}
    hq, hkv, d = (HQ, HKV, D) if not cfg.dry else (8, 2, 32)
    frac = torch.tensor([0.1, 0.3, 0.05, 0.5, 0.2, 0.15, 0.25, 0.4][:hkv], dtype=torch.float64)
    for name, integer in (("integer", True), ("random", False)):
        for ctx in (1000, 3001):
            L = make_layer(3, ctx, ctx + integer, dev, dt_, hq, hkv, d, integer=integer)
            budgets = budget_blocks_batched(frac, L.n_kv.cpu(), BS, 4).to(dev)
            pages, lens = select_blocks_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, frac.to(dev), BS)
            rp, rl = select_blocks_torch(L.q, L.kmin, L.kmax, L.tables, L.n_kv, budgets, BS)
            key = f"{name}_ctx{ctx}"
            out[f"selection_equal_{key}"] = bool(torch.equal(pages, rp) and torch.equal(lens, rl))
            # Random data: a near-tie may round differently in the kernel's dot than in torch.
            mine, ref = chosen_set(pages, budgets), chosen_set(rp, budgets)
            out[f"selection_agreement_{key}"] = round(len(mine & ref) / max(1, len(ref)), 6)
            if integer:
                continue
            bo, blse = balanced_sparse_decode(L.q, L.k, L.v, pages, lens, d**-0.5, cfg.programs)
            backend = SparseAttentionBackend(TorchReferenceBackend(), frac.tolist())
            backend.kmin, backend.kmax = L.kmin, L.kmax
            ro, rlse = backend.sparse_decode(L.q, L.k, L.v, L.tables, L.n_kv, budgets, d**-0.5)
            out[f"balanced_max_abs_err_vs_torch_{key}"] = max(
                float((bo.float() - ro).abs().max()), float((blse - rlse).abs().max())
            )
            full = torch.ones(hkv, dtype=torch.float64, device=dev)
            fp, fl = select_blocks_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, full, BS)
            do, dlse = paged_decode(L.q, L.k, L.v, L.meta, d**-0.5)
            bo, blse = balanced_sparse_decode(L.q, L.k, L.v, fp, fl, d**-0.5, cfg.programs)
            out[f"full_budget_balanced_max_abs_err_vs_dense_{key}"] = max(
                float((bo.float() - do.float()).abs().max()), float((blse - dlse).abs().max())
            )
    if not cfg.dry:  # graph replay after inputs change in place == eager
        L = make_layer(4, 2000, 7, dev, dt_)
        f = frac.to(dev)

        def step():
            p, ln = select_blocks_triton(L.q, L.kmin, L.kmax, L.tables, L.n_kv, f, BS)
            return balanced_sparse_decode(L.q, L.k, L.v, p, ln, D**-0.5)

        L.n_kv.fill_(2000)
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            go, glse = step()
        L.q.copy_(torch.randn_like(L.q))
        L.n_kv.copy_(torch.tensor([2000, 1500, 17, 1], device=dev))
        graph.replay()
        eo, else_ = step()
        out["balanced_graph_replay_equals_eager"] = bool(torch.equal(go, eo) and torch.equal(glse, else_))
    return out


def part_latency(cfg, profile, batch, ctx, timer, kv_budget: bool = False) -> dict:
    """kv_budget: the profile's own per-KV-head budgets (SmolLM2's shape, what the engine
    uses); otherwise the query heads' needs mapped onto cfg.heads' KV heads (layer_fracs)."""
    nb = math.ceil(ctx / BS)
    layers = [
        make_layer(batch, ctx, 100 + i, cfg.device, cfg.dtype, *cfg.heads) for i in range(len(cfg.layers))
    ]
    num = len(layers)
    mb = profile.min_blocks
    hkv = cfg.heads[1]
    if kv_budget:
        adaptive = kv_fracs(profile, cfg.layers, ctx)
    else:
        adaptive = layer_fracs(profile, cfg.layers, hkv, ctx)
    uniform = [[sum(row) / len(row)] * len(row) for row in adaptive]
    row: dict = {
        "batch": batch,
        "context": ctx,
        "layers_per_call": num,
        "shape": "Hq {}, Hkv {}, D {}".format(*cfg.heads),
        "budgets": "profile kv_budget" if kv_budget else "profile head_need of query heads 0..Hkv-1",
        "budget_rule": (
            f"length rule, calibrated at {[round(x) for x in profile.lengths]} tokens"
            + (" (extrapolated past the last)" if profile.lengths and ctx > profile.lengths[-1] else "")
            if profile.lengths
            else "one fraction per head"
        ),
    }

    def fr(fracs):
        return [torch.tensor(r, dtype=torch.float64, device=cfg.device) for r in fracs]

    def pages_cap(fracs):
        return [max(1, int(b.max())) for b in blocks_of(fracs, nb, mb)]

    errors: dict = {}
    row["errors"] = errors

    def per_layer(key, timed, fn):
        t = guarded(errors, key, lambda: timed(fn))
        return None if t is None else round(t / num, 2)

    row["dense_us"] = per_layer("dense", timer.graph, lambda: dense_step(layers))
    row["dense_eager_us"] = per_layer("dense_eager", timer.eager, lambda: dense_step(layers))
    dense = row["dense_us"]

    def measure(name, fracs, eager: bool) -> dict:
        f, cap = fr(fracs), pages_cap(fracs)
        r = {"mean_budget": round(realised_mean(fracs, nb, mb), 4)}
        sel = guarded(errors, f"{name}_select_eager_once", lambda: select_step(layers, f, cap, mb))
        if sel is not None:
            r["kernel_balanced_us"] = per_layer(
                f"{name}_kernel_balanced", timer.graph, lambda: kernel_step(layers, sel, cfg.programs)
            )
        r["select_us"] = per_layer(f"{name}_select", timer.graph, lambda: select_step(layers, f, cap, mb))
        r["total_balanced_us"] = per_layer(
            f"{name}_total_balanced", timer.graph, lambda: total_step(layers, f, cap, mb, cfg.programs)
        )
        if eager:
            r["score_us"] = per_layer(f"{name}_score", timer.graph, lambda: score_step(layers))
            r["select_eager_us"] = per_layer(
                f"{name}_select_eager", timer.eager, lambda: select_step(layers, f, cap, mb)
            )
            r["total_balanced_eager_us"] = per_layer(
                f"{name}_total_balanced_eager",
                timer.eager,
                lambda: total_step(layers, f, cap, mb, cfg.programs),
            )
        for part in ("kernel_balanced", "total_balanced"):
            if dense and r.get(f"{part}_us"):
                r[f"speedup_{part}"] = round(dense / r[f"{part}_us"], 3)
        return r

    row["adaptive"] = measure("adaptive", adaptive, eager=True)
    row["uniform"] = measure("uniform", uniform, eager=False)
    a_t, u_t = row["adaptive"].get("total_balanced_us"), row["uniform"].get("total_balanced_us")
    if a_t and u_t:
        row["balanced_adaptive_over_uniform"] = round(a_t / u_t, 3)  # <= 1: adaptive no slower
    row["balanced_grid_sweep"] = grid_sweep(
        cfg, layers, fr(adaptive), pages_cap(adaptive), mb, timer, errors, num
    )

    budgets = [b.to(cfg.device).expand(batch, -1).contiguous() for b in blocks_of(adaptive, nb, mb)]
    k_top = [int(b.max()) for b in budgets]
    legacy = lambda: legacy_select_step(layers, budgets, nb, k_top)  # noqa: E731
    row["legacy_select_eager_us"] = per_layer("legacy_select_eager", timer.eager, legacy)
    row["legacy_select_graph_us"] = per_layer("legacy_select_graph", timer.graph, legacy)

    sweep = []
    for mean in cfg.fracs:
        if cfg.out_of_time():
            sweep.append({"mean": mean, "skipped": "time budget"})
            continue
        flat = [[mean] * hkv for _ in adaptive]
        entry = {"mean": mean, "uniform": measure(f"uniform{mean}", flat, eager=False)}
        entry["adaptive_scaled"] = measure(f"adaptive{mean}", scaled(adaptive, mean), eager=False)
        sweep.append(entry)
    row["sweep"] = sweep
    if dense:
        row["budget_for_target_balanced"] = budget_for_target(dense, sweep, "total_balanced_us")
    return row


def grid_sweep(cfg, layers, fracs, cap, min_blocks, timer, errors, num) -> dict:
    """Balanced kernel alone, adaptive budgets, grid = k x one wave: is one wave the best?"""
    from fapool.sparse.triton_balanced_decode import default_num_programs

    wave = cfg.programs or default_num_programs(cfg.heads[2], 2, torch.device(cfg.device))
    sel = guarded(errors, "grid_select", lambda: select_step(layers, fracs, cap, min_blocks))
    out: dict = {"one_wave_programs": wave}
    if sel is None:
        return out
    for k in (0.5, 1, 2, 4):
        n = max(1, int(wave * k))
        t = guarded(errors, f"grid_{k}", lambda: timer.graph(lambda: kernel_step(layers, sel, n)))  # noqa: B023
        out[f"kernel_us_{k}_waves"] = None if t is None else round(t / num, 2)
    return out


def budget_for_target(dense_us: float, sweep: list[dict], key: str = "total_balanced_us") -> dict:
    """Mean budget at which selection + kernel reaches TARGET x: a least-squares line
    total_us = a + b * budget through the uniform sweep (time is affine in blocks read)."""
    done = [e["uniform"] for e in sweep if e.get("uniform", {}).get(key)]
    pts = [(u["mean_budget"], u[key]) for u in done]
    out: dict = {"target": TARGET, "target_us": round(dense_us / TARGET, 1)}
    met = [x for x, t in pts if dense_us / t >= TARGET]
    out["largest_swept_budget_meeting_target"] = max(met) if met else None
    if len(pts) >= 2:
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(t for _, t in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        b = sum((x - mx) * (t - my) for x, t in pts) / sxx if sxx else 0.0
        a = my - b * mx
        out["fit_us"] = {"intercept": round(a, 2), "per_unit_budget": round(b, 2)}
        out["budget_estimate"] = round((dense_us / TARGET - a) / b, 4) if b > 0 else None
        out["max_speedup_at_zero_budget"] = round(dense_us / a, 3) if a > 0 else None
    return out


def part_placement(cfg, profile, timer) -> dict:
    from fapool.core.head_placement import contiguous_heads, lpt_heads
    from fapool.sparse.placement import head_weights, layer_loads

    batch, ctx = cfg.placement_batch, cfg.placement_context
    nb = math.ceil(ctx / BS)
    hkv = cfg.heads[1]
    layers = [
        make_layer(batch, ctx, 200 + i, cfg.device, cfg.dtype, *cfg.heads) for i in range(len(cfg.layers))
    ]
    fracs = layer_fracs(profile, cfg.layers, hkv, ctx)
    blocks = [b.tolist() for b in blocks_of(fracs, nb, profile.min_blocks)]
    weights = head_weights(blocks)  # one placement for every layer, as the placement hook does
    cache: dict[tuple, float] = {}

    def share_us(heads: tuple[int, ...], li: int) -> float:
        if (heads, li) not in cache:
            part = layers[li].heads(list(heads))
            f = [torch.tensor([fracs[li][h] for h in heads], dtype=torch.float64, device=cfg.device)]
            cap = [max(1, max(blocks[li][h] for h in heads))]
            cache[heads, li] = timer.graph(
                lambda: total_step([part], f, cap, profile.min_blocks, cfg.programs)
            )
        return cache[heads, li]

    all_heads = tuple(range(hkv))
    one = [share_us(all_heads, li) for li in range(len(layers))]
    out: dict = {
        "batch": batch,
        "context": ctx,
        "note": "simulated workers: each worker's share (its KV heads' caches, selection + balanced "
        "kernel) timed alone on the one GPU; a layer takes its slowest worker",
        "all_heads_one_worker_us": round(sum(one), 1),
        "head_weights_blocks": weights,
        "workers": {},
    }
    for n_w in cfg.workers:
        if n_w > hkv:
            continue
        res = {}
        for name, policy in (("contiguous", contiguous_heads), ("lpt", lpt_heads)):
            if cfg.out_of_time():
                res[name] = {"skipped": "time budget"}
                continue
            placement = policy(hkv, list(range(n_w)), weights)
            per_layer = [[share_us(tuple(hs), li) for hs in placement.values()] for li in range(len(layers))]
            step = sum(max(t) for t in per_layer)
            ideal = sum(sum(t) / n_w for t in per_layer)
            model_max = sum(max(layer_loads(placement, b)) for b in blocks)
            model_mean = sum(sum(b) / n_w for b in blocks)
            res[name] = {
                "placement": {str(w): hs for w, hs in placement.items()},
                "max_worker_us": round(step, 1),
                "mean_worker_us": round(ideal, 1),
                "max_over_mean": round(step / ideal, 4),
                "speedup_vs_one_worker": round(sum(one) / step, 3),
                "per_worker_us": [round(sum(t[w] for t in per_layer), 1) for w in range(n_w)],
                "model_max_over_mean": round(model_max / model_mean, 4),
            }
        if "max_worker_us" in res.get("contiguous", {}) and "max_worker_us" in res.get("lpt", {}):
            res["lpt_gain"] = round(res["contiguous"]["max_worker_us"] / res["lpt"]["max_worker_us"], 3)
        out["workers"][str(n_w)] = res
    return out


ATTENTION_KERNELS = (
    "_decode_",
    "_balanced_",
    "_block_score",
    "_select_compact",
    "_summary",
    "_write_kv",
)


def part_engine(cfg, profile_path: str, batch: int, contexts: list[int], steps: int) -> dict:
    """Engine decode TPOT, SmolLM2-135M's shape with random bf16 weights (fapool.bench.tpot's
    SMOLLM2 through transformers' LlamaConfig + engine_from_hf): dense vs the profile's
    head-adaptive budgets vs a uniform budget of the same total, async scheduling, CUDA graphs."""
    import gc
    import tempfile

    from fapool.bench.tpot import SMOLLM2, hf_model
    from fapool.sparse.profile import SparseProfile

    profile = SparseProfile.load(profile_path)
    uniform_path = os.path.join(tempfile.mkdtemp(), "uniform.json")
    profile.uniform().save(uniform_path)
    hf = hf_model(SMOLLM2, 1)
    kv_tokens = batch * (SMOLLM2["max_position_embeddings"] + 256)
    kv_bytes = kv_tokens * 2 * SMOLLM2["num_hidden_layers"] * SMOLLM2["num_key_value_heads"] * 64 * 2
    out: dict = {
        "model": "SmolLM2-135M-Instruct shape (30 layers, 9/3 heads, d 64), random bf16 weights",
        "batch": batch,
        "decode_steps": steps,
        "profile_mean_kv_budget": round(profile.mean_budget, 4),
        "profile_mean_kv_budget_at_context": {c: round(profile.mean_budget_at(c), 4) for c in contexts},
        "timing": "tpot_ms: median engine step with async scheduling; graph_replay_ms: GPU time of "
        "the step's CUDA graph; attention_us: the graph's attention kernels (KV write, summaries, "
        "selection, decode) by torch.profiler",
        "modes": {},
    }
    # adaptive / uniform: sparse at every step (min context 0), what the kernels give; gated: the
    # engine default, dense in steps whose longest context is below --sparse-min-context.
    modes = {
        "dense": (None, 0),
        "adaptive": (profile_path, 0),
        "uniform": (uniform_path, 0),
        "adaptive_gated": (profile_path, DEFAULT_SPARSE_MIN_CONTEXT),
    }
    out["gated_min_context"] = DEFAULT_SPARSE_MIN_CONTEXT
    errors: dict = {}
    out["errors"] = errors
    for mode, (path, min_ctx) in modes.items():
        guarded(errors, mode, lambda: engine_mode(out, hf, mode, path, min_ctx, batch, contexts, steps, kv_bytes))  # noqa: B023
        gc.collect()
        torch.cuda.empty_cache()
    for i, ctx in enumerate(contexts):
        d = out["modes"].get("dense", [])
        for mode in ("adaptive", "uniform", "adaptive_gated"):
            m = out["modes"].get(mode, [])
            if i >= len(d) or i >= len(m):
                continue
            for key in ("tpot_ms", "graph_replay_ms", "attention_us"):
                if d[i].get(key) and m[i].get(key):
                    out.setdefault("speedup", {}).setdefault(f"ctx{ctx}", {})[f"{mode}_{key}"] = round(
                        d[i][key] / m[i][key], 3
                    )
    return out


def engine_mode(out, hf, mode, path, min_context, batch, contexts, steps, kv_bytes) -> None:
    """One engine (dense, or sparse with the profile at `path` in steps whose longest context
    reaches `min_context`) over the contexts."""
    from fapool.bench.tpot import engine_from_hf, measure_engine

    rows = out["modes"][mode] = []
    eng = engine_from_hf(
        hf,
        kv_cache_memory=2 * kv_bytes,
        max_num_seqs=batch,
        max_num_batched_tokens=8192,
        sparse_attention=path,
        sparse_min_context=min_context,
    )
    out.setdefault("graphs", {})[mode] = eng.executor.runner.use_cuda_graphs
    measure_engine(eng, 2, 64, 4)  # compile the kernels
    for ctx in contexts:
        r = measure_engine(eng, batch, ctx, steps, profile=True)
        kernels = r.pop("kernel_profile", None) or []
        attn = [k for k in kernels if any(a in k["kernel"] for a in ATTENTION_KERNELS)]
        r["attention_us"] = round(sum(k["us_per_step"] for k in attn), 1)
        r["kernels_us"] = round(sum(k["us_per_step"] for k in kernels), 1)  # GPU busy, per step
        r["attention_kernels"] = [
            {"kernel": k["kernel"][:60], "us": round(k["us_per_step"], 1), "calls": k["calls_per_step"]}
            for k in attn
        ]
        r["top_kernels"] = [
            {"kernel": k["kernel"][:60], "us": round(k["us_per_step"], 1)} for k in kernels[:8]
        ]
        rows.append(r)
        print(
            f"  engine {mode} B{batch} ctx {ctx}: TPOT {r['tpot_ms']:.3f} ms, graph "
            f"{fmt(r.get('graph_replay_ms'), '.3f')} ms, attention {r['attention_us']} us",
            flush=True,
        )


# --- driver -----------------------------------------------------------------------------------


@dataclass
class Config:
    device: str
    dtype: torch.dtype
    dry: bool
    heads: tuple[int, int, int]
    layers: list[int]
    fracs: list[float]
    workers: list[int]
    placement_batch: int
    placement_context: int
    deadline: float
    programs: int | None  # balanced kernel grid; None: one wave (dry runs: small, for speed)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=os.path.join(HERE, "results", "sparse_profile-smollm2.json"))
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29", help="profile layers")
    ap.add_argument("--fracs", default="0.0625,0.125,0.25,0.5", help="mean budgets of the sweep")
    ap.add_argument("--workers", default="2,4,8")
    ap.add_argument("--placement-batch", type=int, default=8)
    ap.add_argument("--placement-context", type=int, default=32768)
    ap.add_argument("--warmup-ms", type=int, default=10)
    ap.add_argument("--rep-ms", type=int, default=40)
    ap.add_argument("--time-budget-s", type=float, default=150.0, help="later parts are skipped (GPU runs)")
    ap.add_argument("--engine-batch", type=int, default=8)
    ap.add_argument("--engine-contexts", default="2048,4096,8064", help="SmolLM2's max is 8192 (prompt + decode)")
    ap.add_argument("--engine-steps", type=int, default=20)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine TPOT part")
    ap.add_argument("--smol-contexts", default="4096,8192", help="per-layer latency at SmolLM2's shape")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    args = ap.parse_args()
    start = time.monotonic()
    dry = args.dry_run
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry-run needs TRITON_INTERPRET=1 (Triton's interpreter on CPU)")
    if not dry and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")

    from fapool.bench.results import environment
    from fapool.sparse.profile import SparseProfile

    cfg = Config(
        device="cpu" if dry else "cuda",
        dtype=torch.float16 if dry else torch.bfloat16,  # the interpreter has no bfloat16
        dry=dry,
        heads=(8, 2, 32) if dry else (HQ, HKV, D),
        layers=[int(x) for x in args.layers.split(",")][: 2 if dry else None],
        fracs=[float(x) for x in args.fracs.split(",")],
        workers=[int(x) for x in args.workers.split(",")],
        placement_batch=2 if dry else args.placement_batch,
        placement_context=300 if dry else args.placement_context,
        deadline=start + (math.inf if dry else args.time_budget_s),
        programs=16 if dry else None,
    )
    batches = [2] if dry else [int(x) for x in args.batches.split(",")]
    contexts = [200, 333] if dry else [int(x) for x in args.contexts.split(",")]
    timer = Timer(dry, args.warmup_ms, args.rep_ms)
    profile = SparseProfile.load(args.profile)
    env = environment(cfg.device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"missing: {e}"
    res: dict = {
        "bench": "sparse_gpu",
        "env": env,
        "shape": f"Hq {cfg.heads[0]}, Hkv {cfg.heads[1]}, D {cfg.heads[2]}, {cfg.dtype}, block {BS}",
        "profile": os.path.relpath(args.profile, os.path.join(HERE, "..")),
        "profile_min_blocks": profile.min_blocks,
        "profile_lengths": profile.lengths,
        "layers": cfg.layers,
        "timing": "CUDA graph replays (and eager where named), L2 flushed per call, median, us per layer",
        "dry_run": dry,
        "parts": {},
        "errors": {},
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = os.path.join(args.out_dir, f"sparse_gpu-{stamp}.json")

    def run(name, fn, *a):
        if cfg.out_of_time():
            res["errors"][name] = "skipped: time budget"
            return
        t = time.monotonic()
        try:
            res["parts"][name] = fn(*a)
        except Exception as e:  # record and go on: one failing part must not lose the others
            res["errors"][name] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc()[-3000:])
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        res.setdefault("part_seconds", {})[name] = round(time.monotonic() - t, 1)
        if not dry:
            torch.cuda.empty_cache()
        res["wall_s"] = round(time.monotonic() - start, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        print(f"[{name}] {res['part_seconds'][name]} s", flush=True)

    run("check", part_check, cfg)
    for ctx in contexts:
        run(f"latency_b{batches[0]}_ctx{ctx}", part_latency, cfg, profile, batches[0], ctx, timer)
    # SmolLM2's own attention shape and per-KV-head budgets: the layer-level view of the engine part.
    smol = dataclasses.replace(cfg, heads=(6, 3, 32) if dry else (9, 3, 64), fracs=[])
    for ctx in [200] if dry else [int(x) for x in args.smol_contexts.split(",")]:
        run(
            f"latency_smollm2_b{args.engine_batch}_ctx{ctx}",
            part_latency,
            smol,
            profile,
            2 if dry else args.engine_batch,
            ctx,
            timer,
            True,
        )
    if not (dry or args.no_engine):  # the engine needs a GPU (and transformers for the shape)
        engine_contexts = [int(x) for x in args.engine_contexts.split(",")]
        run("engine", part_engine, cfg, args.profile, args.engine_batch, engine_contexts, args.engine_steps)
    run("placement", part_placement, cfg, profile, timer)  # before the optional larger batches
    for batch in batches[1:]:
        for ctx in contexts:
            run(f"latency_b{batch}_ctx{ctx}", part_latency, cfg, profile, batch, ctx, timer)
    print_table(res)
    print(f"wrote {path} ({res['wall_s']} s)")


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    p = res["parts"]
    print(f"\n{res['env'].get('device')}  {res['shape']}  (us per layer, CUDA graphs, L2 flushed)")
    if "check" in p:
        print("check:", json.dumps(p["check"]))
    print(
        f"{'batch':>5} {'ctx':>6} {'dense':>7} | adaptive (mean budget) kernel / select / total  speedup"
        " | uniform total  speedup | old selection eager/graph"
    )
    for name, r in p.items():
        if not name.startswith("latency"):
            continue
        try:
            a, u = r["adaptive"], r["uniform"]
            print(
                f"{r['batch']:>5} {r['context']:>6} {fmt(r['dense_us']):>7} | ({a['mean_budget']:.3f}) "
                f"{fmt(a.get('kernel_balanced_us'))} / {fmt(a.get('select_us'))} / "
                f"{fmt(a.get('total_balanced_us'))}  x{fmt(a.get('speedup_total_balanced'), '.2f')} | "
                f"{fmt(u.get('total_balanced_us'))}  x{fmt(u.get('speedup_total_balanced'), '.2f')} | "
                f"{fmt(r.get('legacy_select_eager_us'), '.0f')}/{fmt(r.get('legacy_select_graph_us'), '.0f')}"
            )
            for e in r["sweep"]:
                if "uniform" in e:
                    eu, ea = e["uniform"], e["adaptive_scaled"]
                    print(
                        f"{'':>20} mean budget {e['mean']:<6}: uniform "
                        f"{fmt(eu.get('total_balanced_us'))} us "
                        f"x{fmt(eu.get('speedup_total_balanced'), '.2f')} "
                        f"(kernel x{fmt(eu.get('speedup_kernel_balanced'), '.2f')}), adaptive scaled "
                        f"{fmt(ea.get('total_balanced_us'))} us "
                        f"x{fmt(ea.get('speedup_total_balanced'), '.2f')}"
                    )
            print(f"{'':>20} selection stage 1 (scores) alone: {fmt(a.get('score_us'))} us")
            print(f"{'':>20} budget for x{TARGET}: {json.dumps(r.get('budget_for_target_balanced'))}")
            print(f"{'':>20} balanced grid (adaptive kernel): {json.dumps(r.get('balanced_grid_sweep'))}")
            print(f"{'':>20} shape {r.get('shape')}, budgets: {r.get('budgets')}")
            for key, err in r.get("errors", {}).items():
                print(f"{'':>20} ERROR {key}: {err[:200]}")
        except (KeyError, TypeError) as e:
            print(f"{name}: incomplete ({e})")
    if "engine" in p:
        e = p["engine"]
        print(f"engine, {e['model']}, B{e['batch']}, profile mean KV budget {e['profile_mean_kv_budget']}:")
        for mode, rows in e["modes"].items():
            for r in rows:
                print(
                    f"  {mode:>8} ctx {r['context']:>5}: TPOT {r['tpot_ms']:.3f} ms  graph "
                    f"{fmt(r.get('graph_replay_ms'), '.3f')} ms  attention {r.get('attention_us')} us"
                )
        print("  speedup vs dense:", json.dumps(e.get("speedup")))
        for mode, err in e.get("errors", {}).items():
            print(f"  ERROR {mode}: {err[:300]}")
    if "placement" in p:
        pl = p["placement"]
        one = pl["all_heads_one_worker_us"]
        print(f"placement b{pl['batch']} ctx{pl['context']}: all heads on one worker {one} us")
        for n_w, r in pl["workers"].items():
            cells = [
                f"{k} max {v['max_worker_us']} mean {v['mean_worker_us']} (x{v['max_over_mean']})"
                for k, v in r.items()
                if isinstance(v, dict) and "max_worker_us" in v
            ]
            print(f"  {n_w} workers: " + " | ".join(cells) + f"  LPT gain x{r.get('lpt_gain')}")
    for name, err in res["errors"].items():
        print(f"ERROR {name}: {err.splitlines()[0]}")


if __name__ == "__main__":
    main()
