"""What an 8-bit KV cache (`fapool bench kv-quality`) or quantized weights (`fapool bench
quant-quality`) cost in quality: the same model with and without, on real text
(teacher-forced) and on free-running greedy generation from a fixed prompt set.

Teacher-forced: the text is cut into windows; each window is a prompt whose prompt_logprobs
the engine computes in chunks of `--chunk` tokens (so later chunks read the earlier ones back
from the cache). Top-1 agreement is the share of positions whose top (greedy) token is the
same under both; perplexity is of the text's own next tokens. Free-running: greedy tokens
from the same prompts, compared position by position, and the length of the common prefix.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, repo_root, write_result
from fapool.config import QUANTIZATIONS
from fapool.engine.arg_utils import EngineArgs
from fapool.entrypoints.llm import LLM
from fapool.sampling_params import SamplingParams

console = Console()

PROMPTS = [
    "Explain how a paged KV cache works in an inference engine.",
    "Write a short story about a lighthouse keeper.",
    "List the planets of the solar system with one fact each.",
    "What are the trade-offs between tensor and pipeline parallelism?",
    "Describe the water cycle to a ten-year-old.",
    "Give three tips for writing clear technical documentation.",
    "Why do leaves change colour in autumn?",
    "Summarise the rules of chess in a paragraph.",
]


def default_text() -> str:
    """The project's own prose (README and docs/), read from the checkout."""
    root = repo_root()
    paths = [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]
    parts = [Path(p).read_text(encoding="utf-8") for p in paths if os.path.exists(p)]
    if not parts:
        raise SystemExit("no default text found (README.md, docs/*.md): pass --text FILE")
    return "\n\n".join(parts)


def teacher_forced(llms: dict[str, LLM], ids: list[int], window: int) -> dict[str, Any]:
    """Each window's prompt logprobs under both engines (prompt_logprobs=1: the text's token and
    the top-1 token at every position)."""
    names = list(llms)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    agree = total = 0
    nll = dict.fromkeys(names, 0.0)
    for a in range(0, len(ids) - 1, window):
        w = ids[a : a + window + 1]
        if len(w) < 2:
            break
        rows = {n: llms[n].generate([{"prompt_token_ids": w}], params)[0].prompt_logprobs[1:] for n in names}
        for n in names:
            nll[n] -= sum(chosen.logprob for chosen, _top in rows[n])
        agree += sum(x[1].token_id == y[1].token_id for x, y in zip(rows[names[0]], rows[names[1]]))
        total += len(w) - 1
    return {
        "positions": total,
        "top1_agreement": agree / max(1, total),
        "perplexity": {n: math.exp(nll[n] / max(1, total)) for n in names},
    }


def free_running(llms: dict[str, LLM], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = {n: [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] for n, llm in llms.items()}
    ref, cand = outs.values()
    same = sum(x == y for r, c in zip(ref, cand) for x, y in zip(r, c))
    prefix = [next((i for i, (x, y) in enumerate(zip(r, c)) if x != y), len(r)) for r, c in zip(ref, cand)]
    return {
        "prompts": len(PROMPTS),
        "tokens_each": max_tokens,
        "same_position_share": same / (len(PROMPTS) * max_tokens),
        "common_prefix": prefix,
        "identical_outputs": sum(p == max_tokens for p in prefix),
    }


def run(ns: argparse.Namespace, option: str, tested: str) -> dict[str, Any]:
    """The engine with `option` (kv_cache_dtype or quantization) set to `tested` against the
    same engine without it."""
    base = {**vars(EngineArgs.from_cli(ns)), "max_num_batched_tokens": ns.chunk}
    text = Path(ns.text).read_text(encoding="utf-8") if ns.text else default_text()
    reference = "auto" if option == "kv_cache_dtype" else "none"
    llms = {reference: LLM(**{**base, option: None if reference == "none" else reference})}
    llms[tested] = LLM(**{**base, option: tested})
    config = llms[reference].engine.config
    ids = llms[reference].tokenizer.encode(text, add_special_tokens=False)[: ns.max_tokens]
    result: dict[str, Any] = {
        "env": environment(config.device),
        "shapes": {"model": base["model"] or "embedded SmolLM2-135M-Instruct", "dtype": config.dtype,
                   "window": ns.window, "chunk": ns.chunk, "text_tokens": len(ids),
                   "text": ns.text or "README.md + docs/*.md"},
        ("kv_cache_dtypes" if option == "kv_cache_dtype" else "quantizations"): list(llms),
        "free_running": free_running(llms, ns.gen_tokens),
        "teacher_forced": teacher_forced(llms, ids, ns.window),
    }
    for llm in llms.values():
        llm.shutdown()
    what = f"KV {tested}" if option == "kv_cache_dtype" else f"weights {tested}"
    tf, fr = result["teacher_forced"], result["free_running"]
    table = Table(title=f"{what} vs {config.dtype} — {result['env']['device']}")
    for col in ("measure", "value"):
        table.add_column(col)
    table.add_row("top-1 agreement (teacher-forced)", f"{tf['top1_agreement']:.2%} of {tf['positions']} positions")
    for n, p in tf["perplexity"].items():
        table.add_row(f"perplexity, {n}", f"{p:.3f}")
    table.add_row("greedy tokens equal (free-running)", f"{fr['same_position_share']:.2%}")
    table.add_row("identical outputs", f"{fr['identical_outputs']} / {fr['prompts']} ({fr['tokens_each']} tokens)")
    console.print(table)
    ppl = tf["perplexity"]
    summary = (
        f"{what} vs {config.dtype}: top-1 agreement {tf['top1_agreement']:.2%} "
        f"({tf['positions']} positions), perplexity {ppl[tested]:.3f} vs {ppl[reference]:.3f}, "
        f"free-running {fr['same_position_share']:.2%} equal"
    )
    if not ns.no_save:
        name = "kv_quality" if option == "kv_cache_dtype" else "quant_quality"
        console.print(f"wrote {write_result(name, result, summary, ns.out_dir)}")
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    kv = sub.add_parser("kv-quality", help="an 8-bit KV cache against the model's dtype: agreement and perplexity")
    kv.add_argument("--kv-cache-dtype-test", default="fp8", choices=["fp8", "fp8_e4m3", "int8"], help="the cache compared")
    kv.set_defaults(func=lambda ns: (run(ns, "kv_cache_dtype", ns.kv_cache_dtype_test), 0)[1])
    quant = sub.add_parser(
        "quant-quality", help="quantized weights (--quantization-test) against the model's dtype: agreement, perplexity"
    )
    quant.add_argument("--quantization-test", default="int4", choices=list(QUANTIZATIONS), help="the weights compared")
    quant.set_defaults(func=lambda ns: (run(ns, "quantization", ns.quantization_test), 0)[1])
    for p in (kv, quant):
        EngineArgs.add_cli_args(p)
        p.add_argument("--text", default=None, help="text file (default: the project's README and docs)")
        p.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text used (default: %(default)s)")
        p.add_argument(
            "--window", type=int, default=1024, help="tokens per teacher-forced window (default: %(default)s)"
        )
        p.add_argument(
            "--chunk", type=int, default=256, help="prefill chunk (max_num_batched_tokens) (default: %(default)s)"
        )
        p.add_argument("--gen-tokens", type=int, default=64, help="free-running tokens per prompt (default: %(default)s)")
        p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
        p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
