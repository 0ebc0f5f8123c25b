"""Check a single-process decode-step timing against the KV-read roofline (GPU).

`fapool bench pool` times each decode step as the wall time of one `engine.step()`. Under async
scheduling that call launches one step and waits for the one before, so in steady state it is
one step's time; this script measures the same batch three ways and compares tokens:

- async + CUDA graphs (the engine's default), timed per `engine.step()` as bench pool does;
- the same, with a device sync after every step (no overlap: GPU time + host time);
- eager (no graphs, no async), synced per step: the tokens the others must give.

Writes decode_step_check-<stamp>.json (with the KV bytes read per step and the roofline time).

    python benchmarks/decode_step_check.py --batch 8 --contexts 2048,32000 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from fapool import LLM, SamplingParams
from fapool.bench.engine_bench import random_prompts
from fapool.bench.results import environment, write_result

HBM_BYTES_PER_S = 4.8e12  # H200


def measure(ctx: int, batch: int, steps: int, graphs: bool, sync: bool, **kw) -> dict:
    llm = LLM("preset:seed000", device="cuda", dtype="bfloat16", max_num_seqs=batch, **kw)
    engine = llm.engine
    if not graphs:
        engine.executor.runner.use_cuda_graphs = False
    vocab = engine.config.model.vocab_size
    warm = random_prompts(batch, ctx, vocab, 99)
    llm.generate([{"prompt_token_ids": w} for w in warm], SamplingParams(temperature=0.0, max_tokens=2))
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    reqs = [engine.groups[i][0] for i in (engine.add_request(p, params) for p in random_prompts(batch, ctx, vocab, 0))]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = [list(r.output_token_ids) for r in reqs]
    m = engine.config.model
    kv_bytes = batch * ctx * m.kv_bytes_per_token(2)
    row = {
        "context": ctx,
        "batch": batch,
        "graphs": graphs,
        "async": bool(engine.async_scheduling),
        "sync_per_step": sync,
        "steps": len(times),
        "step_ms_median": 1e3 * sorted(times)[len(times) // 2],
        "step_ms_min": 1e3 * min(times),
        "kv_bytes_per_step": kv_bytes,
        "kv_roofline_ms": 1e3 * kv_bytes / HBM_BYTES_PER_S,
        "tokens": tokens,
    }
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="2048,32000")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--kv-cache-memory", type=float, default=24e9)
    ap.add_argument("--out-dir", default=None)
    ns = ap.parse_args()
    rows = []
    for ctx in [int(c) for c in ns.contexts.split(",")]:
        kw = {"kv_cache_memory": int(ns.kv_cache_memory), "max_model_len": ctx + ns.steps + 8}
        runs = [
            measure(ctx, ns.batch, ns.steps, graphs=True, sync=False, **kw),
            measure(ctx, ns.batch, ns.steps, graphs=True, sync=True, **kw),
            measure(ctx, ns.batch, ns.steps, graphs=False, sync=True, async_scheduling=False, **kw),
        ]
        for r in runs:
            r["tokens_equal_eager"] = r["tokens"] == runs[-1]["tokens"]
            print(
                f"ctx {ctx} graphs={r['graphs']} async={r['async']} sync={r['sync_per_step']}: "
                f"step {r['step_ms_median']:.2f} ms (min {r['step_ms_min']:.2f}), KV roofline "
                f"{r['kv_roofline_ms']:.2f} ms, tokens equal eager: {r['tokens_equal_eager']}"
            )
            del r["tokens"]
        rows += runs
    summary = "; ".join(
        f"ctx {r['context']} graphs={r['graphs']} sync={r['sync_per_step']}: {r['step_ms_median']:.2f} ms "
        f"(roofline {r['kv_roofline_ms']:.2f}, tokens equal eager {r['tokens_equal_eager']})"
        for r in rows
    )
    path = write_result("decode_step_check", {"env": environment("cuda"), "rows": rows}, summary, ns.out_dir)
    print(path)


if __name__ == "__main__":
    main()
