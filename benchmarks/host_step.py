"""Host time of a decode step (issue 18): the engine's Python work per step on the CPU, with the
device's share taken out.

A GPU decode step with async scheduling and CUDA graphs is host-bound when the host work
(schedule, fill the graph's input buffers, process the last step's tokens, build outputs) takes
longer than the graph replay. That work is the same Python on any machine, so it is measured
here on the CPU with a tiny random Llama (tests/tiny_models) whose decode steps go through the
real DecodeGraphs.run with a null graph: the pinned buffers are plain CPU tensors, the H2D
copies are CPU copies, the replay writes the next tokens (a counter) and nothing else. The
prefill runs the tiny model eagerly. So a timed step is: Scheduler.schedule, the runner's
launch (DecodeInputs.fill, SamplingBatch.fill_host, the copies), draining the previous step's
tokens (append, stop checks, detokenization) and the outputs, as on the GPU.

Per batch: `batch` prompts of `--context` tokens, FINAL_ONLY greedy (as LLM.generate), then
`--steps` decode steps of the whole batch timed one by one (median and mean), each split into
phases by timers around the engine's methods (phase = the method's own time, nested phases
taken out; each phase's median over the steps). `--ref REF` first runs the same measurement on
the fapool of git REF (extracted with git archive into a temporary folder), back to back, so
before/after share the machine.

    .venv/bin/python benchmarks/host_step.py [--batches 16 64] [--ref HEAD~3] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@contextlib.contextmanager
def cpu_graph_stubs():
    """Let DecodeGraphs.__init__ run on a CPU-only torch: no pinned memory, no CUDA events or
    graph pools, and the decode kernel's split heuristic (its module imports Triton) stubbed."""
    import torch

    zeros = torch.zeros

    def plain_zeros(*args, pin_memory=False, **kwargs):
        return zeros(*args, **kwargs)

    class Event:
        def record(self, *args):
            pass

        def synchronize(self):
            pass

    name = "fapool.attention.triton_decode"
    saved_mod = sys.modules.get(name)
    stub = types.ModuleType(name)
    stub.auto_num_splits = lambda *args, **kwargs: 1
    saved = (torch.zeros, torch.cuda.Event, torch.cuda.graph_pool_handle)
    torch.zeros, torch.cuda.Event, torch.cuda.graph_pool_handle = plain_zeros, Event, lambda: None
    sys.modules[name] = stub
    try:
        yield Event
    finally:
        torch.zeros, torch.cuda.Event, torch.cuda.graph_pool_handle = saved
        if saved_mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved_mod


def install_null_graphs(engine) -> None:
    """Decode steps through the real DecodeGraphs.run, with a graph that only writes tokens."""
    import torch

    from fapool.worker.cuda_graphs import DecodeGraphs

    runner = engine.executor.runner
    sched = engine.config.scheduler
    with cpu_graph_stubs():
        graphs = DecodeGraphs(
            runner.model, runner.backend, runner.kv_caches, sched.max_num_seqs, engine.config.max_model_len,
            runner.block_size,
        )
    vocab = graphs.vocab_size

    class NullGraph:
        def __init__(self, batch: int) -> None:
            self.batch = batch

        def replay(self) -> None:
            # The next tokens: a counter, so detokenized text changes every step.
            s = graphs.sampled[: self.batch]
            s.add_(1).remainder_(vocab - 3).add_(3)

    def capture(batch, splits, sparse):
        return NullGraph(batch), torch.zeros((batch, vocab), dtype=torch.float32)

    graphs._capture = capture
    runner.decode_graphs = graphs
    runner.use_cuda_graphs = True


class PhaseTimer:
    """Wraps methods so each call adds its own time (minus nested wrapped calls) to a phase."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[float] = []  # nested time per open call

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)
        timer = self

        def timed(*args, **kwargs):
            timer._stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                nested = timer._stack.pop()
                timer.totals[phase] = timer.totals.get(phase, 0.0) + dt - nested
                if timer._stack:
                    timer._stack[-1] += dt

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.totals = {}


def build_engine(folder: str, batch: int, context: int, steps: int):
    from fapool import LLM

    max_len = context + steps + 128
    llm = LLM(
        folder,
        device="cpu",
        dtype="float32",
        async_scheduling=True,
        max_num_seqs=max(batch, 8),
        max_num_batched_tokens=4096,
        max_model_len=max_len,
        # 2 layers, K and V, 2 KV heads of 16, float32, twice the room needed
        kv_cache_memory=(batch * max_len * 2 * 2 * 2 * 16 * 4) * 2,
    )
    return llm


def measure(folder: str, batch: int, context: int, steps: int, warmup: int, profile: bool) -> dict:
    import torch

    from fapool.sampling_params import RequestOutputKind, SamplingParams

    llm = build_engine(folder, batch, context, steps)
    engine = llm.engine
    install_null_graphs(engine)
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.executor, "launch", "launch")  # the runner: input buffers, copies, replay
    timer.wrap(engine, "_drain", "process_tokens")  # append, stop checks, detokenize
    timer.wrap(engine, "_finalize", "outputs")
    params = SamplingParams(
        temperature=0.0,
        max_tokens=steps + warmup + 8 + 2 * -(-batch * context // 4096),  # early rows decode during prefill
        ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, engine.config.model.vocab_size, (batch, context), generator=g).tolist()
    rids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.groups[r][0] for r in rids]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    for _ in range(warmup):
        engine.step()
    times = []
    per_phase: dict[str, list[float]] = {}
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    for _ in range(steps):
        timer.reset()
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        times.append(dt)
        for k, v in timer.totals.items():
            per_phase.setdefault(k, []).append(v)
        per_phase.setdefault("other", []).append(dt - sum(timer.totals.values()))
    if prof is not None:
        prof.disable()
    assert all(len(r.output_token_ids) < r.max_tokens for r in reqs), "a request finished in the timed steps"
    assert engine.executor.runner.decode_graphs.last_key is not None, "decode steps missed the graph path"
    # Each phase's median over the steps (a step another process delays moves the mean).
    phases = {k: statistics.median(v + [0.0] * (steps - len(v))) * 1e3 for k, v in per_phase.items()}
    for rid in rids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    profile_rows = None
    if prof is not None:
        import pstats

        st = pstats.Stats(prof)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
            where = os.path.relpath(file, ROOT) if file.startswith(ROOT) else os.path.basename(file)
            rows.append({"fn": f"{where}:{line}:{fn}",
                         "calls_per_step": nc / steps, "own_us_per_step": tt / steps * 1e6,
                         "cum_us_per_step": ct / steps * 1e6})
        rows.sort(key=lambda r: -r["own_us_per_step"])
        profile_rows = rows[:40]
    llm.shutdown()
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "host_ms_median": statistics.median(times) * 1e3,
        "host_ms_mean": statistics.fmean(times) * 1e3,
        "host_ms_p90": sorted(times)[int(0.9 * len(times))] * 1e3,
        "phases_ms_median": phases,
        **({"profile": profile_rows} if profile_rows else {}),
    }


def make_model(folder: str) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import add_byte_tokenizer, make_checkpoint

    make_checkpoint(folder, "llama", seed=0)
    add_byte_tokenizer(folder)


def run_ref(ref: str, ns, folder: str) -> dict:
    """The same measurement on the fapool of `ref`, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "archive", ref, "fapool"]
        archive = subprocess.run(git, cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = os.path.join(tmp, "result.json")
        args = [sys.executable, os.path.abspath(__file__), "--child", out, "--model", folder,
                "--context", str(ns.context), "--steps", str(ns.steps), "--batches", *map(str, ns.batches)]
        subprocess.run(args, env={**os.environ, "PYTHONPATH": tmp}, check=True)
        with open(out) as f:
            return json.load(f)


def run_all(ns, folder: str) -> dict:
    import fapool

    rows = [measure(folder, b, ns.context, ns.steps, ns.warmup, ns.profile) for b in ns.batches]
    return {"fapool": os.path.dirname(fapool.__file__), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--ref", help="also measure the fapool of this git ref first (before/after)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps (top rows in the JSON)")
    p.add_argument("--model", help="a tiny checkpoint folder (default: built in a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; no JSON, no RESULTS.md line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    ns = p.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ns.model or os.path.join(tmp, "llama")
        if not ns.model:
            make_model(folder)
        if ns.child:
            with open(ns.child, "w") as f:
                json.dump(run_all(ns, folder), f)
            return
        before = run_ref(ns.ref, ns, folder) if ns.ref else None
        after = run_all(ns, folder)

    sys.path.insert(0, ROOT)
    from fapool.bench.results import environment, write_result

    def fmt(r):
        ph = ", ".join(f"{k} {v:.3f}" for k, v in r["phases_ms_median"].items())
        return f"B{r['batch']}: {r['host_ms_median']:.3f} ms ({ph})"

    for name, res in (("before", before), ("after", after)):
        if res:
            print(name, res["fapool"])
            for r in res["rows"]:
                print("  ", fmt(r))
    if ns.no_write:
        return
    env = environment("cpu")
    payload = {
        "env": env,
        "shapes": {"model": "tiny llama (tests/tiny_models: 2 layers, hidden 64, vocab 256)",
                   "batches": ns.batches, "context": ns.context, "steps": ns.steps,
                   "output_kind": "FINAL_ONLY", "sampling": "greedy", "async_scheduling": True,
                   "decode": "DecodeGraphs.run with a null graph (CPU buffers)"},
        "ref": ns.ref,
        "before": before,
        "after": after,
    }
    parts = []
    for i, r in enumerate(after["rows"]):
        b = before["rows"][i] if before else None
        head = f"B{r['batch']}x{ns.context}: host "
        head += f"{b['host_ms_median']:.3f} -> " if b else ""
        head += f"{r['host_ms_median']:.3f} ms/step"
        names = ("schedule", "launch", "process_tokens", "outputs", "other")
        ph = lambda x: "/".join(f"{x['phases_ms_median'].get(k, 0):.3f}" for k in names)  # noqa: E731
        parts.append(head + f" (schedule/launch/tokens/outputs/other {ph(b) + ' -> ' if b else ''}{ph(r)})")
    summary = ("decode-step host time, null graph (CPU), FINAL_ONLY greedy, async: " + "; ".join(parts)
               + (f"; before = {ns.ref}" if ns.ref else ""))
    print(write_result("host_step", payload, summary))


if __name__ == "__main__":
    main()
