"""The multi-rank topologies on Ray actors against the same topologies on spawned processes (CPU,
a local Ray instance, the embedded default model): start-up time of the engine (its ranks
started, joined and given their weights) and the median decode step, with the greedy tokens of
both executors compared. The data plane is the same process group either way, so the steps
should match; the start differs in how the processes come up. Executors alternate per
topology, `--repeats` times, so drift on a shared machine hits both alike.

    PYTHONPATH=. python benchmarks/ray_ranks.py [--repeats 2] [--no-save]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from fapool import LLM, SamplingParams
from fapool.bench.engine_bench import random_prompts
from fapool.bench.results import environment, write_result

TOPOLOGIES = {
    "AFD 1:1": dict(afd_attention_ranks=1, afd_ffn_ranks=1),
    "AFD 2:1": dict(afd_attention_ranks=2, afd_ffn_ranks=1),
    "PP 2": dict(pipeline_parallel_size=2),
}


def _run(kw: dict, ns: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    with LLM(device="cpu", **kw) as llm:
        start_s = time.perf_counter() - t0
        engine = llm.engine
        prompts = random_prompts(ns.batch_size, ns.input_len, engine.config.model.vocab_size, 0)
        params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        steps, tokens = [], {}
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            for o in engine.step():
                if o.finished:
                    tokens[o.request_id] = o.outputs[0].token_ids
            steps.append(time.perf_counter() - t)
    return {"start_s": start_s, "decode_step_s": statistics.median(steps[1:]), "tokens": [tokens[i] for i in ids]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-save", action="store_true")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    rows: dict[str, dict[str, list[dict]]] = {}
    try:
        for name, topo in TOPOLOGIES.items():
            rows[name] = {"mp": [], "ray": []}
            for _ in range(ns.repeats):
                for executor in ("mp", "ray"):
                    r = _run(dict(topo, distributed_executor=executor), ns)
                    rows[name][executor].append(r)
                    print(f"{name} {executor}: start {r['start_s']:.2f} s, decode step {r['decode_step_s'] * 1e3:.1f} ms", flush=True)
    finally:
        ray.shutdown()
    parts = []
    for name, by in rows.items():
        equal = all(r["tokens"] == by["mp"][0]["tokens"] for rs in by.values() for r in rs)
        start = {e: [r["start_s"] for r in rs] for e, rs in by.items()}
        step = {e: statistics.median(r["decode_step_s"] for r in rs) for e, rs in by.items()}
        parts.append(
            f"{name}: start mp {min(start['mp']):.2f}-{max(start['mp']):.2f} s, Ray {min(start['ray']):.2f}-"
            f"{max(start['ray']):.2f} s; decode step mp {step['mp'] * 1e3:.1f} ms, Ray {step['ray'] * 1e3:.1f} ms "
            f"(x{step['ray'] / step['mp']:.2f}); tokens {'equal' if equal else 'DIFFER'}"
        )
    summary = (
        f"Ray rank actors vs spawned processes, embedded model, batch {ns.batch_size}, {ns.input_len}+{ns.output_len} "
        f"tokens, 1 thread per rank, {ns.repeats} runs each alternated (local Ray up in {ray_init_s:.1f} s, "
        "not counted): " + "; ".join(parts)
    )
    print(summary)
    res = {
        "env": environment("cpu"),
        "shapes": dict(vars(ns), model="embedded SmolLM2-135M (float32)"),
        "ray_init_s": ray_init_s,
        "runs": {n: {e: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for e, rs in by.items()} for n, by in rows.items()},
    }
    if not ns.no_save:
        print("wrote", write_result("ray_ranks", res, summary))
    return res


if __name__ == "__main__":
    main()
