"""Host time of a decode step on a GPU (issue 18): the seed 000 preset (bf16, CUDA graphs, async
scheduling) at `--batches` x `--context`, FINAL_ONLY greedy.

Per batch, `--steps` async decode steps are timed one by one; a step's host time is its wall
time minus its waits on the device (the in-flight step's tokens, PendingTokens.tokens, and the
last step's input copies, which queue behind its graph), so it is the host's own work whether
or not the GPU is the bottleneck; the graph launch can block too while the device is behind,
so the host time without it is reported as well. `fapool bench tpot`'s measure_engine then
gives TPOT, the graph replay and its sync-mode engine/runner host split for the same point.

`--ref-path DIR`: a folder holding another fapool (e.g. `git archive REF fapool | tar -x -C DIR`,
carried to the device machine, which has no git history), measured in turn with this checkout's,
each run in its own process, `--repeats` times: before/after on the same machine.

    python3 benchmarks/host_step_gpu.py [--ref-path benchmarks/tmp/old] [--ref-name 0e263f1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(batches: list[int], context: int, steps: int) -> dict:
    import torch

    import fapool
    from fapool.bench.tpot import measure_engine
    from fapool.entrypoints.llm import LLM
    from fapool.sampling_params import RequestOutputKind, SamplingParams
    from fapool.worker import model_runner

    waits: list[float] = []
    tokens = model_runner.PendingTokens.tokens

    def timed_tokens(self):
        t = time.perf_counter()
        try:
            return tokens(self)
        finally:
            waits.append(time.perf_counter() - t)

    model_runner.PendingTokens.tokens = timed_tokens
    launches: list[float] = []
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(self):  # the graph launch: it blocks while the device is behind
        t = time.perf_counter()
        try:
            return replay(self)
        finally:
            launches.append(time.perf_counter() - t)

    torch.cuda.CUDAGraph.replay = timed_replay
    llm = LLM(
        "preset:seed000", gpu_memory_utilization=0.5, max_num_seqs=max(batches), max_num_batched_tokens=16384
    )
    engine = llm.engine
    measure_engine(engine, 2, 64, 4)  # compiles the kernels
    graphs = engine.executor.runner.decode_graphs

    class TimedEvent:  # DecodeGraphs waits on it for the last step's input copies: device time
        def __init__(self, event) -> None:
            self.event = event

        def record(self) -> None:
            self.event.record()

        def synchronize(self) -> None:
            t = time.perf_counter()
            self.event.synchronize()
            waits.append(time.perf_counter() - t)

    graphs._copied = TimedEvent(graphs._copied)
    rows = []
    for batch in batches:
        params = SamplingParams(
            temperature=0.0, max_tokens=steps + 64, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
        )
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(100, engine.config.model.vocab_size, (batch, context), generator=g).tolist()
        ids = [engine.add_request(p, params) for p in prompts]
        reqs = [engine.groups[i][0] for i in ids]
        while any(not r.output_token_ids for r in reqs):
            engine.step()
        for _ in range(8):
            engine.step()
        wall, host, launch = [], [], []
        for _ in range(steps):
            waits.clear()
            launches.clear()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            wall.append(dt)
            host.append(dt - sum(waits))
            launch.append(sum(launches))
        for i in ids:
            engine.abort_request(i)
        while engine.has_unfinished_requests():
            engine.step()
        ref = measure_engine(engine, batch, context, 32)
        rows.append(
            {
                "batch": batch,
                "context": context,
                "async_step_ms": statistics.median(wall) * 1e3,
                "async_host_ms": statistics.median(host) * 1e3,
                "graph_launch_ms": statistics.median(launch) * 1e3,  # inside async_host_ms
                "async_host_excl_launch_ms": statistics.median([h - g for h, g in zip(host, launch)]) * 1e3,
                "tpot_ms": ref["tpot_ms"],
                "graph_replay_ms": ref["graph_replay_ms"],
                "sync_engine_host_ms": ref["engine_host_ms"],
                "sync_runner_host_ms": ref["runner_host_ms"],
            }
        )
    llm.shutdown()
    return {"fapool": os.path.dirname(fapool.__file__), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ref-path", help="a folder with another fapool to measure first")
    p.add_argument("--ref-name", default=None, help="what --ref-path holds (a commit), for the record")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of before and after")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        with open(ns.child, "w") as f:
            json.dump(measure(ns.batches, ns.context, ns.steps), f)
        return

    def child(path: str, tag: str) -> dict:
        out = os.path.join(ROOT, "benchmarks", "tmp", f"host_step_gpu-{tag}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        args = [sys.executable, os.path.abspath(__file__), "--child", out, "--context", str(ns.context),
                "--steps", str(ns.steps), "--batches", *map(str, ns.batches)]
        subprocess.run(args, env={**os.environ, "PYTHONPATH": os.path.abspath(path)}, check=True)
        with open(out) as f:
            return json.load(f)

    # Before and after alternate, each in a fresh process; each figure is the median over the
    # repeats (the host's speed drifts between runs on a shared machine).
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(ns.repeats):
        if ns.ref_path:
            runs["before"].append(child(ns.ref_path, "before"))
        runs["after"].append(child(ROOT, "after"))

    def merged(results: list[dict]) -> dict | None:
        if not results:
            return None
        rows = []
        for i, row in enumerate(results[0]["rows"]):
            m = dict(row)
            for k, v in row.items():
                if k.endswith("_ms") and v is not None:
                    m[k] = statistics.median(r["rows"][i][k] for r in results)
                    m[k + "_runs"] = [r["rows"][i][k] for r in results]
            rows.append(m)
        return {"fapool": results[0]["fapool"], "repeats": len(results), "rows": rows}

    before, after = merged(runs["before"]), merged(runs["after"])
    assert after is not None
    sys.path.insert(0, ROOT)
    from fapool.bench.results import environment, write_result

    parts = []
    for i, r in enumerate(after["rows"]):
        b = before["rows"][i] if before else None
        head = f"B{r['batch']}x{r['context']}: "
        if b:
            head += (f"async host {b['async_host_ms']:.2f} -> {r['async_host_ms']:.2f} ms/step (without the "
                     f"graph launch, which waits for the device: {b['async_host_excl_launch_ms']:.2f} -> "
                     f"{r['async_host_excl_launch_ms']:.2f}), step "
                     f"{b['async_step_ms']:.2f} -> {r['async_step_ms']:.2f} ms "
                     f"(graph {r['graph_replay_ms']:.2f})")
        else:
            head += (f"async host {r['async_host_ms']:.2f} ms/step, step {r['async_step_ms']:.2f} ms "
                     f"(graph {r['graph_replay_ms']:.2f})")
        parts.append(head)
    summary = "seed000 bf16 decode, CUDA graphs, async, FINAL_ONLY greedy: " + "; ".join(parts)
    if before:
        summary += f"; before = {ns.ref_name or ns.ref_path}"
    payload = {"env": environment("cuda"), "ref": ns.ref_name, "before": before, "after": after}
    print(json.dumps(payload))
    print(write_result("host_step_gpu", payload, summary, ns.out_dir))


if __name__ == "__main__":
    main()
