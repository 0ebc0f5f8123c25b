"""Issue 19's miniature of disaggregation on a CPU: one thread per process, each rank one more
device. The single one-thread process, Lamina (one dense rank, one attention worker, pool
threshold 0) and AFD (one attention rank, one FFN rank) serve the same batch in one process,
their decode steps timed in alternating rounds so that the machine's drift hits every engine
alike. Prints throughput vs the single process and each side's utilisation (busy seconds over
the timed wall time), and writes benchmarks/results/disagg_miniature-*.json.

    .venv/bin/python benchmarks/disagg_miniature.py --batch 8 --context 2048
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

from fapool import LLM, SamplingParams
from fapool.bench.engine_bench import random_prompts
from fapool.bench.results import environment, write_result


def engines(ns) -> dict[str, dict]:
    out = {}
    for m in ns.micro_batches:
        out[f"Lamina x1, {m} mb"] = dict(attention_workers=1, pool_threshold=0, micro_batches=m)
    for m in ns.micro_batches:
        out[f"AFD 1:1, {m} mb"] = dict(afd_attention_ranks=1, afd_ffn_ranks=1, micro_batches=m)
    return out


def busy(reports, wall: float) -> dict[str, float]:
    """Each side's busy share of the timed wall time: the driver's compute, every other rank's
    compute, every attention worker's attention."""
    sides: dict[str, float] = {}
    for s in reports:
        for r, acc in s.ranks.items():
            key = f"rank {r} ({acc.role or 'dense'})"
            sides[key] = sides.get(key, 0.0) + acc.compute_s
        for w, acc in s.workers.items():
            sides[f"attention worker {w}"] = sides.get(f"attention worker {w}", 0.0) + acc.compute_s
    return {k: v / wall for k, v in sorted(sides.items())}


def _stream(seconds: float) -> None:
    """One thread reading memory end to end (what a dense rank's weight reads look like)."""
    torch.set_num_threads(1)
    x = torch.randn(100_000_000)
    end = time.time() + seconds
    while time.time() < end:
        x.sum()


def contention(ns, cfg) -> dict[str, float]:
    """The attention side's kernel (cpu_decode, this batch and context, every layer) alone and
    while another process streams memory on the other core: the two cores share one memory
    system, so a rank is "one more device" for compute but not for memory bandwidth."""
    from fapool.attention import cpu_decode

    lib = cpu_decode.load()
    bs, h, d = 16, cfg.num_key_value_heads, cfg.head_dim
    nb = ns.batch * ns.context // bs
    dt = getattr(torch, ns.dtype)
    caches = [(torch.randn(nb, bs, h, d).to(dt), torch.randn(nb, bs, h, d).to(dt)) for _ in range(cfg.num_hidden_layers)]
    tables = torch.randperm(nb).to(torch.int32).view(ns.batch, -1).contiguous()
    lens = torch.full((ns.batch,), ns.context, dtype=torch.int32)
    q = torch.randn(ns.batch, h, cfg.num_attention_heads // h, d)

    def step() -> float:
        t = time.perf_counter()
        for k, v in caches:
            cpu_decode.decode_attention(lib, q, k, v, tables, lens, ns.context)
        return time.perf_counter() - t

    step()
    alone = statistics.median(step() for _ in range(5))
    proc = mp.get_context("spawn").Process(target=_stream, args=(8.0,))
    proc.start()
    time.sleep(2.0)  # its tensor filled, streaming
    beside = statistics.median(step() for _ in range(5))
    proc.join()
    return {"attention_step_ms_alone": 1e3 * alone, "attention_step_ms_beside_a_streaming_core": 1e3 * beside}


def _pair(ns, prompts, single: LLM, name: str, llm: LLM) -> dict:
    """The single process and one multi-rank engine on the same requests, their decode steps
    timed in alternating rounds."""
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    pair = {"single": single.engine, name: llm.engine}
    reqs, ids = {}, {}
    for key, eng in pair.items():
        ids[key] = [eng.add_request(x, params) for x in prompts]
        reqs[key] = [eng.groups[i][0] for i in ids[key]]
        while any(not r.output_token_ids for r in reqs[key]):
            eng.step()
        for _ in range(2):  # warm: the decode path, the micro-batch policy's first probes
            eng.step()
    steps = {k: [] for k in pair}
    wall, kept = 0.0, []
    for _ in range(ns.rounds):
        for key, eng in pair.items():
            eng.executor.reports.clear()
            t0 = time.perf_counter()
            for _ in range(ns.steps):
                t = time.perf_counter()
                eng.step()
                steps[key].append(time.perf_counter() - t)
            if key == name:
                wall += time.perf_counter() - t0
                kept += list(eng.executor.reports)
    n = min(len(r.output_token_ids) for rs in reqs.values() for r in rs)
    equal = [r.output_token_ids[:n] for r in reqs[name]] == [r.output_token_ids[:n] for r in reqs["single"]]
    for key, eng in pair.items():
        for i in ids[key]:
            eng.abort_request(i)
        while eng.has_unfinished_requests():
            eng.step()
    mine, ref = statistics.median(steps[name]), statistics.median(steps["single"])
    return {
        "config": name,
        "step_ms_median": 1e3 * mine,
        "single_step_ms_median": 1e3 * ref,
        "step_ms_all": [1e3 * x for x in steps[name]],
        "single_step_ms_all": [1e3 * x for x in steps["single"]],
        "x_single": ref / mine,  # throughput ratio: the same batch in every step
        "utilisation": busy(kept, wall),
        "micro_batches_chosen": sorted({s.num_micro_batches for s in kept}),
        "tokens_equal_single": equal,
        "tokens_compared": n,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="decode steps per engine and round")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-save", action="store_true")
    ns = p.parse_args()
    torch.set_num_threads(1)
    common = dict(dtype=ns.dtype, kv_cache_memory=1 << 30)
    single = LLM(**common)  # prefix caching: each pairing re-prefills only the prompts' last block
    probe = contention(ns, single.engine.config.model)
    print(f"attention kernel, every layer: {probe['attention_step_ms_alone']:.1f} ms alone, "
          f"{probe['attention_step_ms_beside_a_streaming_core']:.1f} ms beside a core streaming memory", flush=True)
    vocab = single.engine.config.model.vocab_size
    prompts = random_prompts(ns.batch, ns.context, vocab, 0)
    rows = []
    for name, kw in engines(ns).items():
        with LLM(**common, **kw) as llm:  # one multi-rank engine a process
            rows.append(_pair(ns, prompts, single, name, llm))
        r = rows[-1]
        util = ", ".join(f"{k} {v:.0%}" for k, v in r["utilisation"].items())
        print(f"{name:18s} {r['step_ms_median']:7.1f} ms vs single {r['single_step_ms_median']:.1f} ms: x{r['x_single']:.2f}  "
              f"tokens equal: {r['tokens_equal_single']}  micro-batches {r['micro_batches_chosen']}  busy: {util}", flush=True)
    single.shutdown()
    summary = (
        f"batch {ns.batch} x {ns.context}, {ns.dtype}, 1 thread a process, throughput vs the single process in the same rounds: "
        + ", ".join(f"{r['config']} x{r['x_single']:.2f} (busy {'/'.join(f'{v:.0%}' for v in r['utilisation'].values())})" for r in rows)
        + f"; attention kernel {probe['attention_step_ms_alone']:.0f} ms alone, {probe['attention_step_ms_beside_a_streaming_core']:.0f} ms beside a streaming core"
    )
    if not ns.no_save:
        result = {"env": environment("cpu"), "args": vars(ns), "contention": probe, "runs": rows}
        print("wrote", write_result("disagg_miniature", result, summary))
    print(summary)


if __name__ == "__main__":
    main()
