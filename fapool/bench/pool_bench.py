"""`fapool bench pool`: the same requests through the single-process engine and through each
multi-rank topology, side by side: the attention pool (seed 000) and the static TP / PP
baselines, Lamina (seed 004: every token's KV on attention workers, --lamina-modes) and
attention-FFN disaggregation (seed 002, --afd R:F). Greedy parity, TPOT, throughput and the
per-rank breakdown (utilisation of each side, communication share, overlap, micro-batches).

Every configuration is one engine that serves each --input-len in turn (starting worker
processes is the slow part). On CUDA the ranks get their own GPUs when there are enough,
else they share the GPU over gloo (fapool.worker.comm.place_ranks); each row records which.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, write_result
from fapool.config import ray_runs
from fapool.engine.arg_utils import EngineArgs
from fapool.entrypoints.breakdown import summarize
from fapool.entrypoints.llm import LLM
from fapool.sampling_params import SamplingParams
from fapool.worker import comm

console = Console()
if not console.is_terminal:  # logs (the device tool's output): do not squeeze the table to 80 columns
    console.width = 180
WARMUP_SEED = 1  # warm-up prompts differ from the measured ones (seed 0): no prefix-cache hits


def _configs(ns: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The single-process reference first; with --tp N / --pp N the static baselines next. The
    pool configurations run with one dense rank, and with --tp N / --pp N also beside N
    tensor-parallel ranks / pipeline stages."""
    pool = dict(pool_threshold=ns.pool_threshold, tokens_per_pool_worker=ns.tokens_per_pool_worker)
    tp, pp = ns.tensor_parallel_size, ns.pipeline_parallel_size

    def cfg(tp_size: int, workers: int, pp_size: int = 1, **kw) -> dict[str, Any]:
        return dict(tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size, attention_workers=workers, **kw)

    out: list[tuple[str, dict[str, Any]]] = [("single process", cfg(1, 0))]
    if tp > 1:
        out.append((f"TP {tp}", cfg(tp, 0)))
    if pp > 1:
        out.append((f"PP {pp}", cfg(1, 0, pp)))
    a = max(ns.workers)
    modes = ns.pool_modes
    fixed = ns.micro_batches  # None: each step's count chosen from measured step times
    if "shard" in modes:
        for w in ns.workers:
            out.append((f"pool shard x{w}", cfg(1, w, pool_mode="shard", micro_batches=fixed, **pool)))
        if fixed is None:  # the choices the policy picks between, pinned
            for m in (1, 2):
                label = f"pool shard x{a}, {m} micro-batch{'es' if m > 1 else ''}"
                out.append((label, cfg(1, a, pool_mode="shard", micro_batches=m, **pool)))
    for mode in (m for m in modes if m != "shard"):
        out.append((f"pool {mode} x{a}", cfg(1, a, pool_mode=mode, micro_batches=fixed, **pool)))
    if tp > 1:
        for mode in modes:
            out.append((f"TP {tp} + pool {mode} x{a}", cfg(tp, a, pool_mode=mode, micro_batches=fixed, **pool)))
    if pp > 1:
        for mode in modes:
            out.append((f"PP {pp} + pool {mode} x{a}", cfg(1, a, pp, pool_mode=mode, **pool)))
    for mode in ns.lamina_modes:
        lamina = dict(pool, pool_threshold=0)
        out.append((f"Lamina {mode} x{a}", cfg(1, a, pool_mode=mode, micro_batches=fixed, **lamina)))
        if fixed is None:
            for m in (1, 2):
                out.append((f"Lamina {mode} x{a}, {m} mb", cfg(1, a, pool_mode=mode, micro_batches=m, **lamina)))
    for spec in ns.afd:
        r, f = (int(x) for x in spec.split(":"))
        out.append((f"AFD {r}:{f}", cfg(1, 0, afd_attention_ranks=r, afd_ffn_ranks=f, micro_batches=fixed)))
        if fixed is None:
            for m in (1, 2):
                out.append((f"AFD {r}:{f}, {m} mb", cfg(1, 0, afd_attention_ranks=r, afd_ffn_ranks=f, micro_batches=m)))
    if len(out) > 1:  # the reference once more at the end: its ratio to the first is the machine's drift
        out.append(("single process, again", cfg(1, 0)))
    return out


def _measure(llm: LLM, ns: argparse.Namespace, input_len: int) -> tuple[list[list[int]], dict[str, Any]]:
    """Prefill the batch, then time `output_len` decode steps in which every request decodes:
    TPOT is the median of those steps at this context. Requests run without a token limit and
    are aborted after the window: with chunked prefill the first requests start decoding long
    before the last, and a limit would let them finish while the last still prefill, so the
    measured steps would hold part of the batch. Tokens: each request's first output_len."""
    from fapool.bench.engine_bench import random_prompts

    engine = llm.engine
    vocab = engine.config.model.vocab_size
    prompts = random_prompts(ns.batch_size, input_len, vocab, 0)
    on_gpu = engine.executor.runner.device.type == "cuda"
    # Warm-up: on a GPU the full batch at this length (Triton compiles per shape); on a CPU a
    # short prompt touches every path, and a long one would only add minutes of prefill.
    warm = random_prompts(ns.batch_size if on_gpu else 1, input_len if on_gpu else 16, vocab, WARMUP_SEED)
    llm.generate([{"prompt_token_ids": w} for w in warm], SamplingParams(temperature=0.0, max_tokens=2))
    executor = engine.executor
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.groups[i][0] for i in ids]
    pool_size = PoolSizes(engine)
    t = time.perf_counter()
    while any(not r.output_token_ids for r in reqs):
        engine.step()
        pool_size.record()
    prefill_s = time.perf_counter() - t
    executor.reports.clear()
    steps: list[float] = []
    for _ in range(ns.output_len):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
        pool_size.record()
    elapsed = time.perf_counter() - t
    summary = summarize(executor.reports)
    for i in ids:
        engine.abort_request(i)
    while engine.has_unfinished_requests():  # drain an in-flight step (async scheduling)
        engine.step()
    engine.resize_pool()  # an elastic pool stops its idle workers (after their timeout)
    pool_size.record()
    tokens = [list(r.output_token_ids[: ns.output_len]) for r in reqs]
    if min(map(len, tokens)) < ns.output_len - 1:
        raise RuntimeError(f"a request decoded fewer than {ns.output_len - 1} tokens in the window")
    ranks = getattr(executor, "rank_devices", None)
    row = {
        "input_len": input_len,
        "backend": comm.transport_name() if ranks else None,
        "devices": list(ranks.devices) if ranks else [str(executor.runner.device)],
        "e2e_s": elapsed,
        "prefill_s": prefill_s,
        "decode_steps": len(steps),
        "decode_batch": ns.batch_size,  # every request decodes in every timed step
        "tpot_ms_median": 1e3 * sorted(steps)[len(steps) // 2] if steps else None,
        "tpot_ms_p20": 1e3 * sorted(steps)[len(steps) // 5] if steps else None,
        "output_tokens_per_s": ns.batch_size * len(steps) / sum(steps) if steps else None,
        "breakdown": summary,
        "pool_size_over_time": pool_size.series if pool_size.enabled else None,
    }
    if pool_size.enabled:
        console.print(f"  pool size over time (per step; workers holding KV / live): {pool_size.describe()}")
    return tokens, row


class PoolSizes:
    """The attention pool's size after each step: workers holding KV (the PoolManager's
    placement) and live worker processes (on Ray, the actors running)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.enabled = engine.pool_manager is not None
        self.series: dict[str, list[int]] = {"with_kv": [], "live": []}

    def record(self) -> None:
        if self.enabled:  # the two counts only: engine.stats() walks every request's blocks
            self.series["with_kv"].append(len(self.engine.pool_manager.active_workers()))
            self.series["live"].append(self.engine.executor.live_pool_workers())

    def describe(self) -> str:
        """Run-length: "0/0 x3, 1/1 x2, 2/2 x27" (with KV / live, steps)."""
        pairs = list(zip(self.series["with_kv"], self.series["live"]))
        runs = [(p, len(list(g))) for p, g in itertools.groupby(pairs)]
        return ", ".join(f"{k}/{lv} x{n}" for (k, lv), n in runs)


def _run_config(kwargs: dict[str, Any], ns: argparse.Namespace) -> list[tuple[list[list[int]], dict]]:
    with LLM(**kwargs) as llm:
        return [_measure(llm, ns, n) for n in ns.input_len]


def _release_device() -> None:
    """Free the last engine's KV cache before the next one sizes its own from free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(ns: argparse.Namespace) -> int:
    if ns.threads:
        # CPU: the single process and the pool's driver get this many threads; each attention
        # worker computes on one, so every worker adds a core the way the seed adds a GPU.
        torch.set_num_threads(ns.threads)
    base = EngineArgs.from_cli(ns)
    rows: list[dict[str, Any]] = []
    reference: dict[int, list[list[int]]] = {}
    t_run = time.perf_counter()
    for name, extra in _configs(ns):
        t_config = time.perf_counter()
        kwargs = {**vars(base), **extra}
        if kwargs.get("afd_attention_ranks"):
            world = kwargs["afd_attention_ranks"] + (kwargs.get("afd_ffn_ranks") or 0)
        else:
            world = (kwargs.get("tensor_parallel_size") or 1) * (kwargs.get("pipeline_parallel_size") or 1)
        if not ray_runs(kwargs.get("attention_workers") or 0, world):
            kwargs["distributed_executor"] = "mp"  # --distributed-executor ray is for the rows Ray runs
        results = _run_config(kwargs, ns)
        _release_device()
        for tokens, row in results:
            want = reference.setdefault(row["input_len"], tokens)
            rows.append({
                "config": name,
                **extra,
                **row,
                "tokens_equal_single_process": tokens == want,
                # Greedy tokens agree up to the first divergence; in bf16 a near-tie in the
                # logits can flip on rounding differences (float32 parity is what tests pin).
                "prefix_agreement": _prefix_agreement(tokens, want),
            })
        console.print(f"done: {name} in {time.perf_counter() - t_config:.0f} s ({time.perf_counter() - t_run:.0f} s so far)")
        if ns.out_dir:  # what a run cut short by a time limit still leaves behind
            os.makedirs(ns.out_dir, exist_ok=True)
            with open(os.path.join(ns.out_dir, "pool_partial.json"), "w") as f:
                json.dump(rows, f, indent=2)
    _print_table(rows, ns)
    device = base.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "env": environment(device),
        "shapes": {
            "model": base.model or "embedded SmolLM2-135M", "dtype": base.dtype or ("float32" if device == "cpu" else "bfloat16"),
            "attention_backend": base.attention_backend or ("triton" if device.startswith("cuda") else "torch"),
            "batch": ns.batch_size, "input_len": list(ns.input_len), "output_len": ns.output_len,
            "pool_threshold": ns.pool_threshold, "tp": ns.tensor_parallel_size, "pp": ns.pipeline_parallel_size,
            "tokens_per_pool_worker": ns.tokens_per_pool_worker, "workers": list(ns.workers),
            "pool_modes": list(ns.pool_modes), "lamina_modes": list(ns.lamina_modes), "afd": list(ns.afd),
            "kv_cache_memory_per_rank": base.kv_cache_memory,
            "micro_batches": ns.micro_batches, "threads": torch.get_num_threads(), "enforce_eager": base.enforce_eager,
        },
        "runs": rows,
    }
    ok = all(r["tokens_equal_single_process"] for r in rows)
    parts = []
    for n in ns.input_len:
        mine = [r for r in rows if r["input_len"] == n]
        parts.append(f"in {n}: " + ", ".join(
            f"{r['config']} TPOT x{r['tpot_ms_median'] / mine[0]['tpot_ms_median']:.2f}" for r in mine[1:]))
    summary = f"batch {ns.batch_size}, out {ns.output_len}: parity {'ok' if ok else 'FAILED'}; " + "; ".join(parts)
    if not ns.no_save:
        console.print(f"wrote {write_result('pool', result, summary, out_dir=ns.out_dir)}")
    return 0 if ok else 1


def _utilisation(b: dict | None) -> str:
    """Every rank's compute share of the wall time: dense ranks (TP), then attention workers."""
    if not b:
        return "-"
    ranks = dict(b.get("dense_ranks") or {})
    ranks.setdefault(0, {"utilisation": b["driver"]["utilisation"]})  # with a pool the driver reports apart
    dense = "/".join(f"{acc['utilisation']:.0%}" for _, acc in sorted(ranks.items()))
    workers = "/".join(f"{acc['utilisation']:.0%}" for _, acc in sorted(b["workers"].items()))
    return dense + (f" | {workers}" if workers else "")


def _print_table(rows: list[dict[str, Any]], ns: argparse.Namespace) -> None:
    table = Table(title=f"multi-rank topologies vs single process — batch {ns.batch_size}, out {ns.output_len}")
    cols = ("config", "in", "same tokens (prefix)", "TPOT (ms)", "tok/s", "util ranks | pool", "comm share", "overlap",
            "pool size", "micro-batches", "plan (ms)", "comm")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        b = r["breakdown"]
        table.add_row(
            r["config"], str(r["input_len"]),
            "yes" if r["tokens_equal_single_process"] else f"no ({r['prefix_agreement']:.0%})",
            f"{r['tpot_ms_median']:.1f}" if r["tpot_ms_median"] else "-", f"{r['output_tokens_per_s']:.1f}",
            _utilisation(b), f"{b['driver']['comm_share']:.0%}" if b else "-",
            f"{b['overlap_mean']:.0%}" if b and b["overlap_mean"] is not None else "-",
            f"{b['pool_size']['min']}..{b['pool_size']['max']}" if b else "-",
            " ".join(f"{m}:{n}" for m, n in sorted(b["micro_batches"].items())) if b else "-",
            f"{b['plan_ms_per_step']:.2f}" if b else "-",
            r["backend"] or "-",
        )
    console.print(table)


def _prefix_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of reference tokens generated identically before each sequence first diverges."""
    same = total = 0
    for got, want in zip(tokens, reference):
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        same += n
        total += len(want)
    return same / total if total else 1.0


def _afd_spec(text: str) -> str:
    r, sep, f = text.partition(":")
    if not (sep and r.isdigit() and f.isdigit()):
        raise argparse.ArgumentTypeError(f"expected R:F (attention and FFN ranks), got {text!r}")
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="attention pool, Lamina and AFD topologies vs the single-process engine")
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--input-len", type=int, nargs="+", default=[96], help="one or more prompt lengths")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--pool-modes", nargs="*", default=["shard", "replicate", "head"], choices=["shard", "replicate", "head"],
        help="pool modes to run (shard also runs each --workers count and 1 micro-batch); none: no pool rows",
    )
    p.add_argument(
        "--lamina-modes", nargs="*", default=[], choices=["shard", "replicate", "head"],
        help="Lamina rows (pool threshold 0, the largest --workers) in these modes (default: none)",
    )
    p.add_argument(
        "--afd", nargs="*", default=[], metavar="R:F", type=_afd_spec,
        help="attention-FFN disaggregation rows, R attention and F FFN ranks each (default: none)",
    )
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the single process and of the pool's driver (workers use one each)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=run)
