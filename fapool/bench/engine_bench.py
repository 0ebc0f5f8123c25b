"""Latency and throughput of fapool beside Hugging Face transformers `generate`, same model,
same prompts, same process, so the ratio is meaningful even where absolute times drift."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, write_result
from fapool.engine.arg_utils import EngineArgs
from fapool.entrypoints.llm import LLM
from fapool.models.loader import ModelSource, resolve_model
from fapool.sampling_params import SamplingParams
from fapool.worker.model_runner import DTYPES

console = Console()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids where tokenizers keep their special tokens.
    return torch.randint(min(100, vocab // 2), vocab, (n, length), generator=g).tolist()


def load_hf_model(src: ModelSource, dtype: torch.dtype, device: str):
    """The same checkpoint through transformers, or None where transformers cannot load it."""
    from transformers import AutoModelForCausalLM

    if src.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=dtype
        )
    elif src.format == "hf":
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, attn_implementation="sdpa")
    else:
        return None
    return model.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate_time(model, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    _sync(device)
    return time.perf_counter() - t


def fapool_run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - t, outs


def run_bench(mode: str, ns: argparse.Namespace) -> dict[str, Any]:
    args = EngineArgs.from_cli(ns)
    llm = LLM(**vars(args))
    config = llm.engine.config
    device = config.device
    src = resolve_model(args.model)
    n = ns.batch_size if mode == "latency" else ns.num_prompts
    prompts = random_prompts(n, ns.input_len, config.model.vocab_size, ns.bench_seed)
    shapes = {"model": src.path, "batch": n, "input_len": ns.input_len, "output_len": ns.output_len,
              "dtype": config.dtype, "quantization": config.quantization, "block_size": config.cache.block_size}

    fapool_run(llm, prompts[:1], 2)  # warm-up
    # On a CPU both engines are timed in alternation, iteration by iteration, so a machine that
    # slows or speeds up mid-run weighs on both alike. On a GPU fapool's KV reservation leaves no
    # room for a second copy of the weights: HF runs after it, as before.
    hf_model, hf_times = None, {"full": [], "first": []}
    interleaved = ns.hf and device == "cpu"
    if interleaved:
        hf_model = load_hf_model(src, DTYPES[config.dtype], device)
        if hf_model is not None:
            hf_generate_time(hf_model, prompts[:1], 2, device)  # warm-up
    step_stats = llm.engine.executor.reports
    step_stats.clear()  # the breakdown covers the timed runs only
    # Cold: every timed run gets prompts no earlier run has seen, so no prefill is a prefix-cache
    # hit (HF recomputes every prompt too). Cached: the last run's prompts once more.
    e2e, ttft, tpot = [], [], []
    for it in range(ns.iters):
        fresh = random_prompts(n, ns.input_len, config.model.vocab_size, ns.bench_seed + 1 + it)
        dt, outs = fapool_run(llm, fresh, ns.output_len)
        e2e.append(dt)
        ttft += [o.ttft for o in outs if o.ttft is not None]
        tpot += [o.tpot for o in outs if o.tpot is not None]
        if hf_model is not None:
            hf_times["full"].append(hf_generate_time(hf_model, fresh, ns.output_len, device))
            hf_times["first"].append(hf_generate_time(hf_model, fresh, 1, device))
    cached_ttft = None
    if config.cache.enable_prefix_caching:
        _, outs = fapool_run(llm, fresh, ns.output_len)
        cached_ttft = statistics.median(o.ttft for o in outs if o.ttft is not None)
    ours = {
        "e2e_s": statistics.median(e2e),
        "ttft_s": statistics.median(ttft),
        "ttft_prefix_cached_s": cached_ttft,
        "tpot_s": statistics.median(tpot) if tpot else None,
        "output_tokens_per_s": n * ns.output_len / statistics.median(e2e),
    }
    result: dict[str, Any] = {"env": environment(device), "mode": mode, "shapes": shapes, "fapool": ours}
    if step_stats:  # attention pool or TP/PP: where the time went, per worker
        from fapool.entrypoints.breakdown import breakdown_table, summarize

        result["breakdown"] = summarize(step_stats)
        console.print(breakdown_table(result["breakdown"]))
    llm.shutdown()

    hf = None
    if ns.hf:
        del llm
        if not interleaved:
            hf_model = load_hf_model(src, DTYPES[config.dtype], device)
            if hf_model is not None:
                hf_generate_time(hf_model, prompts[:1], 2, device)  # warm-up
                for _ in range(ns.iters):
                    hf_times["full"].append(hf_generate_time(hf_model, prompts, ns.output_len, device))
                for _ in range(ns.iters):
                    hf_times["first"].append(hf_generate_time(hf_model, prompts, 1, device))
        if hf_model is None:
            result["hf"] = {"skipped": f"transformers cannot load {src.format} models"}
        else:
            full, first = statistics.median(hf_times["full"]), statistics.median(hf_times["first"])
            hf = {
                "e2e_s": full,
                "ttft_s": first,
                "tpot_s": (full - first) / max(1, ns.output_len - 1),
                "output_tokens_per_s": n * ns.output_len / full,
            }
            result["hf"] = hf
            result["speedup_vs_hf"] = {
                "e2e": hf["e2e_s"] / ours["e2e_s"],
                "tpot": hf["tpot_s"] / ours["tpot_s"] if ours["tpot_s"] else None,
                "throughput": ours["output_tokens_per_s"] / hf["output_tokens_per_s"],
            }
            if interleaved:  # each iteration's HF time over fapool's, run back to back
                result["speedup_vs_hf"]["throughput_paired"] = statistics.median(
                    h / o for h, o in zip(hf_times["full"], e2e)
                )
            hf["e2e_runs_s"] = hf_times["full"]
    ours["e2e_runs_s"] = e2e
    result["interleaved_with_hf"] = interleaved

    table = Table(title=f"fapool bench {mode} — {result['env']['device']}")
    for col in ("engine", "e2e (s)", "TTFT (ms)", "TPOT (ms)", "out tok/s"):
        table.add_column(col, justify="right")
    for name, r in (("fapool", ours), ("HF generate", hf)):
        if r:
            table.add_row(name, f"{r['e2e_s']:.3f}", f"{r['ttft_s'] * 1e3:.1f}",
                          f"{r['tpot_s'] * 1e3:.2f}" if r["tpot_s"] else "-", f"{r['output_tokens_per_s']:.1f}")
    if cached_ttft is not None:
        table.add_row("fapool, prompts prefix-cached", "-", f"{cached_ttft * 1e3:.1f}", "-", "-")
    console.print(table)
    weights = f", weights {config.quantization}" if config.quantization else ""
    summary = f"batch {n}, in {ns.input_len}, out {ns.output_len}{weights}: {ours['output_tokens_per_s']:.1f} tok/s"
    if "speedup_vs_hf" in result:
        s = result["speedup_vs_hf"]
        paired = f" (iteration by iteration: x{s['throughput_paired']:.2f})" if "throughput_paired" in s else ""
        console.print(f"speed-up vs HF generate: throughput x{s['throughput']:.2f}{paired}, TPOT x{s['tpot'] or 0:.2f}")
        summary += f", x{s['throughput']:.2f} HF throughput{paired}, TPOT x{s['tpot'] or 0:.2f} vs HF"
    if not ns.no_save:
        path = write_result(f"{mode}", result, summary)
        console.print(f"wrote {path}")
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fapool.bench import kernels, kv_quality, linear, tpot, ttft

    kernels.add_parser(sub)
    linear.add_parser(sub)
    tpot.add_parser(sub)
    ttft.add_parser(sub)
    kv_quality.add_parser(sub)
    for mode, help_ in (("latency", "one batch, end to end"), ("throughput", "many prompts at once")):
        p = sub.add_parser(mode, help=help_)
        EngineArgs.add_cli_args(p)
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=64)
        if mode == "latency":
            p.add_argument("--batch-size", type=int, default=1)
        else:
            p.add_argument("--num-prompts", type=int, default=32)
        p.add_argument("--iters", type=int, default=3)
        p.add_argument("--bench-seed", type=int, default=0)
        p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
        p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
        p.set_defaults(func=lambda ns, mode=mode: (run_bench(mode, ns), 0)[1])
