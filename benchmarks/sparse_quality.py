"""Sparse vs dense decode quality on held-out real text (seed 003), CPU or GPU.

For each held-out window (tragedies and Roman plays, never calibrated on): prefill `ctx`
tokens densely (as serving does), then score the next N tokens teacher-forced as decode
queries, `--eval-chunk` per step (query j sits at position ctx + j and sees KV 0..ctx + j; each
query's K/V at every layer comes from its step, so sparse attention feeds forward exactly as in
decoding). Variants run from the same prefilled cache: dense, the profile's head-adaptive
budgets (retargeted to each `--targets` recall), and a uniform budget of the same total (for a
length-rule profile: the same total at every calibrated length). Reports perplexity of the true
next tokens, argmax (greedy) agreement with dense, and the share of KV entries sparse decode
reads; every budget is the one the engine would run (SparseAttentionBackend with the
profile's rule per layer), float32 weights.

    python benchmarks/sparse_quality.py --profile P.json [--device cuda --windows 8 --eval-tokens 512]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fapool.attention.metadata import AttentionMetadata
from fapool.attention.sparse import SparseAttentionBackend
from fapool.attention.torch_ref import TorchReferenceBackend
from fapool.bench.results import environment, write_result
from fapool.sparse.calibrate import load_model, new_caches, prefill
from fapool.sparse.corpus import CORPUS_PACKAGE, token_windows
from fapool.sparse.profile import SparseProfile


@torch.no_grad()
def score_steps(model, ids, ctx, num_eval, caches, table, block_size, chunk):
    """Logits of the N teacher-forced decode queries at positions ctx .. ctx+N-1, `chunk`
    queries a step -> [N, V]."""
    dev = caches[0][0].device
    out = []
    for a in range(ctx, ctx + num_eval, chunk):
        pos = list(range(a, min(a + chunk, ctx + num_eval)))
        meta = AttentionMetadata.build(
            query_lens=[1] * len(pos),
            query_pos_start=pos,
            kv_lens=[p + 1 for p in pos],
            block_tables=[table] * len(pos),
            slot_mapping=[table[p // block_size] * block_size + p % block_size for p in pos],
            device=dev,
        )
        hidden = model(torch.tensor(ids[pos[0] : pos[-1] + 1], device=dev), torch.tensor(pos, device=dev), caches, meta)
        out.append(model.compute_logits(hidden).float())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--contexts", default="1024,2048,4096")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows per context")
    ap.add_argument("--per-play", type=int, default=1, help="consecutive windows taken from one play")
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--eval-chunk", type=int, default=128, help="decode queries per scoring step")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--targets", default=None, help="also retarget the profile to these recalls, e.g. 0.95,0.98"
    )
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    profile = SparseProfile.load(args.profile)
    dense = TorchReferenceBackend()
    model, tokenizer, src = load_model(args.model, dense, args.device)
    layers = model.model.layers
    targets = [float(t) for t in args.targets.split(",")] if args.targets else [profile.target_recall]
    profiles = {t: profile.retarget(t) if t != profile.target_recall else profile for t in targets}
    variants: dict[str, SparseProfile] = {}
    for t, p in profiles.items():
        variants[f"adaptive-{t:g}"] = p
        variants[f"uniform-{t:g}"] = p.uniform()
    contexts = [int(c) for c in args.contexts.split(",")]
    n = args.eval_tokens
    rows = []
    plays: dict[int, list[str]] = {}
    for ctx in contexts:
        windows, plays[ctx] = token_windows(
            tokenizer, "heldout", args.windows, ctx + n + 1, per_play=args.per_play, with_names=True
        )
        acc = {v: {"nll": 0.0, "agree": 0, "read": 0, "full": 0} for v in ("dense", *variants)}
        t0 = time.perf_counter()
        for ids in windows:
            caches, table = new_caches(model, ctx + n + 1, args.block_size, args.device)
            summaries = [
                SparseAttentionBackend(dense, profile.rule(i), profile.min_blocks) for i in range(len(layers))
            ]
            for layer, b in zip(layers, summaries):
                layer.self_attn.backend = b
            prefill(model, ids[:ctx], caches, table, 0, args.block_size)  # dense; builds block summaries
            saved = [(k.clone(), v.clone()) for k, v in caches]
            target = torch.tensor(ids[ctx + 1 : ctx + n + 1], device=args.device)
            dense_argmax = None
            for name in ("dense", *variants):
                for (k, v), (k0, v0) in zip(caches, saved):
                    k.copy_(k0)
                    v.copy_(v0)
                if name == "dense":
                    for layer in layers:
                        layer.self_attn.backend = dense
                else:
                    for i, layer in enumerate(layers):
                        b = SparseAttentionBackend(dense, variants[name].rule(i), profile.min_blocks)
                        b.kmin, b.kmax = summaries[i].kmin.clone(), summaries[i].kmax.clone()
                        layer.self_attn.backend = b
                logits = score_steps(model, ids, ctx, n, caches, table, args.block_size, args.eval_chunk)
                logp = torch.log_softmax(logits, -1)
                argmax = logits.argmax(-1)
                dense_argmax = argmax if name == "dense" else dense_argmax
                acc[name]["nll"] += float(-logp.gather(1, target[:, None]).sum())
                acc[name]["agree"] += int((argmax == dense_argmax).sum())
                if name != "dense":
                    acc[name]["read"] += sum(layer.self_attn.backend.sparse_tokens for layer in layers)
                    acc[name]["full"] += sum(layer.self_attn.backend.sparse_dense_tokens for layer in layers)
            for layer in layers:
                layer.self_attn.backend = dense
        scored = n * len(windows)
        row = {
            "context": ctx,
            "windows": len(windows),
            "scored_tokens": scored,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        dense_ppl = math.exp(acc["dense"]["nll"] / scored)
        for name, a in acc.items():
            ppl = math.exp(a["nll"] / scored)
            agree = a["agree"] / scored
            row[name] = {
                "ppl": round(ppl, 4),
                "ppl_vs_dense": round(ppl / dense_ppl - 1, 5),
                "greedy_agreement": round(agree, 4),
                # binomial standard error of the agreement over the scored tokens
                "agreement_stderr": round(math.sqrt(max(agree * (1 - agree), 1e-12) / scored), 4),
                "kv_read_fraction": round(a["read"] / a["full"], 4) if a["full"] else 1.0,
            }
            if name != "dense":
                row[name]["profile_mean_budget_at_context"] = round(variants[name].mean_budget_at(ctx), 4)
        rows.append(row)
        print(row, flush=True)

    payload = {
        "env": environment(args.device),
        "model": src.path,
        "profile": args.profile,
        "profile_lengths": profile.lengths,
        "mean_budget_by_target": {f"{t:g}": round(p.mean_budget, 4) for t, p in profiles.items()},
        "min_blocks": profile.min_blocks,
        "block_size": args.block_size,
        "corpus": f"{CORPUS_PACKAGE} held-out split (tragedies, Roman plays)",
        "windows_by_context": plays,
        "eval_tokens_per_window": n,
        "results": rows,
    }
    summary = "; ".join(
        f"ctx {r['context']}: "
        + ", ".join(
            f"recall {t:g} (KV read {r[f'adaptive-{t:g}']['kv_read_fraction']:.0%}) adaptive ppl "
            f"{r[f'adaptive-{t:g}']['ppl_vs_dense']:+.2%} agree {r[f'adaptive-{t:g}']['greedy_agreement']:.1%}, "
            f"uniform {r[f'uniform-{t:g}']['ppl_vs_dense']:+.2%} agree {r[f'uniform-{t:g}']['greedy_agreement']:.1%}"
            for t in targets
        )
        for r in rows
    )
    rule = f"length rule over {len(profile.lengths)} calibrated lengths" if profile.lengths else "one fraction per head"
    summary = (
        f"SmolLM2 sparse decode vs dense ({rule}), held-out Shakespeare, {n} tok x {args.windows} windows/ctx: "
        + summary
    )
    if not args.no_write:
        print(write_result("sparse_quality", payload, summary, out_dir=args.out_dir))
    print(summary)


if __name__ == "__main__":
    main()
