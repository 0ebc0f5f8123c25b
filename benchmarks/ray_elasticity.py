"""Join and leave latency of the elastic attention pool on Ray (CPU, a local Ray instance), on the
embedded default model: requests whose contexts cross the pool threshold while decoding make the
pool start Ray actors mid-generation; once they finish, the workers idle past
`pool_idle_timeout_s` are stopped. Workers started on demand (--pool-prestart-tokens 0) and
ahead of need (the default), in one run. Per cycle:

    join        from asking Ray for an actor to its first message through the pair group
    join wait   how long steps waited for joins (on demand: the whole join), and the slowest
                decode step against the median one
    leave       from the driver's stop to the actor's process gone, and to Ray's CPUs free again

    PYTHONPATH=. python benchmarks/ray_elasticity.py [--cycles 3] [--pipeline-parallel-size 2] [--no-save]

With --pipeline-parallel-size, the dense side is that many stages (Ray actors too) and a
joining worker pairs with every stage's leader.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch

from fapool import LLM, SamplingParams
from fapool.bench.engine_bench import random_prompts
from fapool.bench.results import environment, write_result

WORKERS = 2
THRESHOLD = 256  # tokens held by the dense rank before a sequence's KV goes to the pool


def _cycle(llm: LLM, seed: int, ns: argparse.Namespace) -> dict:
    engine = llm.engine
    pool = engine.executor.runner.ray_pool
    joins_before, waits_before = len(pool.join_seconds), len(pool.join_wait_seconds)
    prompts = random_prompts(ns.batch_size, THRESHOLD - 96, engine.config.model.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    steps = []  # (seconds, live workers after the step)
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t0, pool.num_live))
    joins = pool.join_seconds[joins_before:]
    waits = pool.join_wait_seconds[waits_before:]
    # Leave: the workers idle now; the engine stops them once idle past the timeout.
    pids = {w: live.pid for w, live in pool.live.items()}
    cpus = ray.cluster_resources().get("CPU", 0.0) - (ns.pipeline_parallel_size - 1)  # the stages keep theirs
    t_idle = time.perf_counter()
    stopped_before = pool.num_stopped
    while pool.num_stopped - stopped_before < len(pids):
        engine.resize_pool()
        time.sleep(0.005)
    t_stop = time.perf_counter()
    gone_s = free_s = None
    while gone_s is None or free_s is None:
        now = time.perf_counter() - t_stop
        if gone_s is None and not any(os.path.exists(f"/proc/{p}") for p in pids.values()):  # Linux
            gone_s = now
        if free_s is None and ray.available_resources().get("CPU", 0.0) >= cpus:
            free_s = now
        if now > 60:
            raise RuntimeError("Ray did not return the stopped workers within 60 s")
        time.sleep(0.005)
    decode = [s for s, _ in steps[1:]]  # after the prefill step
    return {
        "join_s": joins,
        "join_wait_s": sum(waits),
        "slowest_step_s": max(decode),
        "median_step_s": statistics.median(decode),
        "live_workers_per_step": [n for _, n in steps],
        "step_s": [s for s, _ in steps],
        "idle_to_stop_s": t_stop - t_idle,
        "stop_to_process_gone_s": gone_s,
        "stop_to_ray_cpus_free_s": free_s,
        "workers_stopped": len(pids),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=160, help="tokens decoded per request (crossing the threshold after 96)")
    ap.add_argument("--idle-timeout-s", type=float, default=1.0)
    ap.add_argument("--pool-prestart-tokens", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--pipeline-parallel-size", type=int, default=1, help="dense stages beside the pool")
    ap.add_argument("--no-save", action="store_true")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    # A CPU for each pool worker and each stage past the driver's (both Ray actors).
    ray.init(num_cpus=WORKERS + ns.pipeline_parallel_size - 1, include_dashboard=False, log_to_driver=False)
    runs = {}
    try:
        for ahead in ns.pool_prestart_tokens:
            kw = dict(
                distributed_executor="ray",
                attention_workers=WORKERS,
                pool_threshold=THRESHOLD,
                tokens_per_pool_worker=THRESHOLD,
                pool_idle_timeout_s=ns.idle_timeout_s,
                pool_prestart_tokens=ahead,
                pipeline_parallel_size=ns.pipeline_parallel_size,
            )
            with LLM(**kw) as llm:
                cycles = runs[ahead] = []
                for c in range(ns.cycles):
                    cycles.append(_cycle(llm, c, ns))
                    r = cycles[-1]
                    print(
                        f"prestart {ahead}, cycle {c}: joins {[round(x, 2) for x in r['join_s']]} s; steps waited "
                        f"{r['join_wait_s']:.2f} s for them; slowest step {r['slowest_step_s'] * 1e3:.0f} ms, median "
                        f"{r['median_step_s'] * 1e3:.0f} ms; stop -> process gone {r['stop_to_process_gone_s'] * 1e3:.0f}"
                        f" ms, -> Ray CPUs free {r['stop_to_ray_cpus_free_s'] * 1e3:.0f} ms",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    res = {
        "env": environment("cpu"),
        "shapes": dict(vars(ns), workers=WORKERS, pool_threshold=THRESHOLD, model="embedded SmolLM2-135M (float32)"),
        "runs": {str(k): v for k, v in runs.items()},
    }
    parts = []
    for ahead, cycles in runs.items():
        joins = [x for r in cycles for x in r["join_s"]]
        waits = [r["join_wait_s"] for r in cycles]
        slow = [r["slowest_step_s"] / r["median_step_s"] for r in cycles]
        gone = [r["stop_to_process_gone_s"] for r in cycles]
        free = [r["stop_to_ray_cpus_free_s"] for r in cycles]
        parts.append(
            f"prestart {ahead} tokens: join {min(joins):.2f}-{max(joins):.2f} s, steps waited "
            f"{min(waits):.2f}-{max(waits):.2f} s a cycle, slowest step x{min(slow):.1f}-{max(slow):.1f} the median; "
            f"stop to process gone {min(gone) * 1e3:.0f}-{max(gone) * 1e3:.0f} ms, to Ray's CPUs free "
            f"{min(free) * 1e3:.0f}-{max(free) * 1e3:.0f} ms"
        )
    summary = (
        f"Ray elastic pool, embedded model, {WORKERS} workers beside {ns.pipeline_parallel_size} dense stage(s), {ns.cycles} cycles of {ns.batch_size} requests "
        f"crossing the {THRESHOLD}-token threshold while decoding: " + "; ".join(parts)
    )
    print(summary)
    if not ns.no_save:
        print("wrote", write_result("ray_elasticity", res, summary))
    return res


if __name__ == "__main__":
    main()
