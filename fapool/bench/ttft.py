"""`fapool bench ttft`: time to first token of long prompts (chunked prefill) against the prefill
roofline, on the seed 000 preset (GPU).

The roofline is the prompt's FLOPs over the bf16 matmul rate measured in the same run: the
projections, FFN and LM head (2 x matmul parameters x tokens; the LM head for the last token
only) plus causal attention (QK^T and PV over the lower triangle: 2 x 2 x L(L+1)/2 x heads x
head_dim per layer). Every timed prompt is fresh and prefix caching is off, so nothing is reused;
one untimed prompt of each length runs first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, write_result
from fapool.bench.tpot import random_prompts
from fapool.config import ModelConfig
from fapool.sampling_params import SamplingParams

console = Console()


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 GEMM rate (n x n x n, median of `iters`) in TFLOP/s."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    times = []
    for i in range(iters + 5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def prefill_flops(m: ModelConfig, tokens: int) -> float:
    h, d = m.hidden_size, m.head_dim
    qkv = h * (m.num_attention_heads + 2 * m.num_key_value_heads) * d
    out = m.num_attention_heads * d * h
    ffn = (3 if m.gated_mlp else 2) * h * m.intermediate_size
    dense = 2 * m.num_hidden_layers * (qkv + out + ffn) * tokens + 2 * h * m.vocab_size
    attention = 4 * m.num_hidden_layers * m.num_attention_heads * d * tokens * (tokens + 1) / 2
    return dense + attention


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from fapool.entrypoints.llm import LLM

    lengths = [int(x) for x in ns.lengths.split(",")]
    llm = LLM(
        "preset:seed000",
        device="cuda",
        max_model_len=max(lengths) + 1,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_num_seqs=1,
        enable_prefix_caching=False,
        gpu_memory_utilization=ns.gpu_memory_utilization,
    )
    m = llm.engine.config.model
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    tflops = matmul_tflops()
    rows = []
    for i, n in enumerate(lengths):
        # One untimed prompt of this length first: the chunk shapes' one-time costs (cuDNN
        # builds an execution plan per new shape) are not TTFT.
        llm.generate([{"prompt_token_ids": random_prompts(1, n, m.vocab_size, seed=99 + i)[0]}], params)
        times = []
        for r in range(ns.iters):
            prompt = random_prompts(1, n, m.vocab_size, seed=1000 * i + r)[0]
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params)
            times.append(time.perf_counter() - t)
        flops = prefill_flops(m, n)
        roofline = flops / (tflops * 1e12)
        ttft = statistics.median(times)
        rows.append({"prompt_tokens": n, "ttft_s": ttft, "flops": flops, "roofline_s": roofline,
                     "x_roofline": ttft / roofline, "achieved_TFLOPs": flops / ttft / 1e12,
                     "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9, "runs": times})
        console.print(f"{n} tokens: TTFT {ttft:.3f} s, roofline {roofline:.3f} s (x{ttft / roofline:.2f})")
    llm.shutdown()
    result = {
        "env": environment("cuda"),
        "shapes": {"model": "preset:seed000", "dtype": llm.engine.config.dtype, "lengths": lengths,
                   "max_num_batched_tokens": ns.max_num_batched_tokens, "prefix_caching": False},
        "matmul_TFLOPs": tflops,
        "rows": rows,
    }
    table = Table(title=f"TTFT vs prefill roofline — {result['env']['device']} (bf16 GEMM {tflops:.0f} TFLOP/s)")
    for col in ("prompt", "TTFT (s)", "roofline (s)", "x roofline", "TFLOP/s", "peak GB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["prompt_tokens"]), f"{r['ttft_s']:.3f}", f"{r['roofline_s']:.3f}",
                      f"{r['x_roofline']:.2f}", f"{r['achieved_TFLOPs']:.0f}", f"{r['peak_memory_GB']:.1f}")
    console.print(table)
    summary = "seed000 TTFT " + ", ".join(
        f"{r['prompt_tokens'] // 1024}K {r['ttft_s']:.2f} s (x{r['x_roofline']:.2f} roofline)" for r in rows
    ) + f", chunk {ns.max_num_batched_tokens}"
    if not ns.no_save:
        console.print(f"wrote {write_result('ttft', result, summary, ns.out_dir)}")
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ttft", help="long-prompt TTFT (chunked prefill) against the prefill roofline (GPU)")
    p.add_argument("--lengths", default="32768,131072", help="prompt lengths (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="prefill chunk (default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--iters", type=int, default=3, help="fresh prompts timed per length (default: %(default)s)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
