"""`fapool bench pool`: the same requests through the single-process engine and through each
attention-pool configuration, side by side: greedy parity, TPOT, throughput and the
per-worker breakdown (utilisation, communication share, overlap)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, write_result
from fapool.engine.arg_utils import EngineArgs
from fapool.entrypoints.breakdown import summarize
from fapool.entrypoints.llm import LLM
from fapool.sampling_params import SamplingParams

console = Console()


def _configs(ns: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The single-process reference first; with --tp N the static TP baseline next, and
    every pool configuration then runs with N tensor-parallel dense ranks."""
    pool = dict(pool_threshold=ns.pool_threshold, tokens_per_pool_worker=ns.tokens_per_pool_worker)
    out: list[tuple[str, dict[str, Any]]] = [
        ("single process", dict(tensor_parallel_size=1, pipeline_parallel_size=1, attention_workers=0))
    ]
    tp = ns.tensor_parallel_size
    prefix = f"TP {tp} + " if tp > 1 else ""
    if tp > 1:
        out.append((f"TP {tp}", dict(attention_workers=0)))
    for a in ns.workers:
        out.append((f"{prefix}pool shard x{a}", dict(attention_workers=a, pool_mode="shard", **pool)))
    a = max(ns.workers)
    out.append((f"{prefix}pool shard x{a}, 1 micro-batch", dict(attention_workers=a, micro_batches=1, **pool)))
    out.append((f"{prefix}pool replicate x{a}", dict(attention_workers=a, pool_mode="replicate", **pool)))
    out.append((f"{prefix}pool head x{a}", dict(attention_workers=a, pool_mode="head", **pool)))
    return out


def run(ns: argparse.Namespace) -> int:
    from fapool.bench.engine_bench import random_prompts

    base = EngineArgs.from_cli(ns)
    rows, reference = [], None
    for name, extra in _configs(ns):
        kwargs = {**vars(base), **extra}
        with LLM(**kwargs) as llm:
            prompts = random_prompts(ns.batch_size, ns.input_len, llm.engine.config.model.vocab_size, 0)
            params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
            items = [{"prompt_token_ids": p} for p in prompts]
            llm.generate(items[:1], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
            runner = llm.engine.runner
            if hasattr(runner, "step_stats"):
                runner.step_stats.clear()
            t = time.perf_counter()
            outs = llm.generate(items, params)
            elapsed = time.perf_counter() - t
            tokens = [o.token_ids for o in outs]
            reference = reference or tokens
            summary = summarize(getattr(runner, "step_stats", []))
        tpots = sorted(o.tpot for o in outs if o.tpot)
        rows.append({
            "config": name,
            **extra,
            "tokens_equal_single_process": tokens == reference,
            # Greedy tokens agree up to the first divergence; in bf16 a near-tie in the logits
            # can flip on rounding differences (float32 parity is what the tests pin).
            "prefix_agreement": _prefix_agreement(tokens, reference),
            "e2e_s": elapsed,
            "tpot_ms_median": 1e3 * tpots[len(tpots) // 2] if tpots else None,
            "output_tokens_per_s": ns.batch_size * ns.output_len / elapsed,
            "breakdown": summary,
        })
    table = Table(title=f"attention pool vs single process — batch {ns.batch_size}, in {ns.input_len}, out {ns.output_len}")
    for col in ("config", "same tokens (prefix agreement)", "TPOT (ms)", "tok/s", "driver util", "comm share", "overlap", "pool size"):
        table.add_column(col, justify="right")
    for r in rows:
        b = r["breakdown"]
        table.add_row(
            r["config"], "yes" if r["tokens_equal_single_process"] else f"no ({r['prefix_agreement']:.0%})",
            f"{r['tpot_ms_median']:.1f}" if r["tpot_ms_median"] else "-", f"{r['output_tokens_per_s']:.1f}",
            f"{b['driver']['utilisation']:.0%}" if b else "-", f"{b['driver']['comm_share']:.0%}" if b else "-",
            f"{b['overlap_mean']:.0%}" if b and b["overlap_mean"] is not None else "-",
            f"{b['pool_size']['min']}..{b['pool_size']['max']}" if b else "-",
        )
    console.print(table)
    result = {"env": environment(base.device or "cpu"), "shapes": {
        "model": base.model or "embedded SmolLM2-135M", "batch": ns.batch_size, "input_len": ns.input_len,
        "output_len": ns.output_len, "pool_threshold": ns.pool_threshold, "tp": ns.tensor_parallel_size,
        "tokens_per_pool_worker": ns.tokens_per_pool_worker}, "runs": rows}
    ok = all(r["tokens_equal_single_process"] for r in rows)
    single = rows[0]["output_tokens_per_s"]
    summary = f"batch {ns.batch_size}, in {ns.input_len}, out {ns.output_len}: parity {'ok' if ok else 'FAILED'}; " + ", ".join(
        f"{r['config']} x{r['output_tokens_per_s'] / single:.2f}" for r in rows[1:])
    if not ns.no_save:
        console.print(f"wrote {write_result('pool', result, summary)}")
    return 0 if ok else 1


def _prefix_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of reference tokens generated identically before each sequence first diverges."""
    same = total = 0
    for got, want in zip(tokens, reference):
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        same += n
        total += len(want)
    return same / total if total else 1.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="attention pool configurations vs the single-process engine")
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=run)
