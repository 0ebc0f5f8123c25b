"""The CPU matmul candidates behind `--quantization`, on the embedded SmolLM2's shapes: one decode
step's linears (every layer's qkv, o, gate_up, down, each layer its own weights, so they stream
from memory as in the engine) and the tied LM head, at 1, 8 and 16 rows.

    PYTHONPATH=. python benchmarks/cpu_quant_kernels.py [--threads 2] [--no-save]

Candidates: float32 and bf16 through oneDNN with packed weights (the float32 default; bf16 is
what the quantized linears use above 8 rows and the quantized head at every row count), int8 per
channel and int4 in groups of 32 through aten's weight-only kernels (bf16 activations), and
fapool's own int4 kernel (cpu_int4.c, AVX512-BF16), fbgemm's dynamic int8 linear (activations quantized per tensor at run time).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from fapool.bench.results import environment, write_result
from fapool.layers import cpu_int4
from fapool.layers.cpu_quant import GROUP_SIZE, quantize_int4, quantize_int8

NUM_LAYERS = 30
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]: qkv, o, gate_up, down
HEAD_SHAPE = (49152, 576)
ROWS = (1, 4, 8, 12, 16, 64)
METHODS = ("float32_packed", "bf16_packed", "int8_weight_only", "int4_weight_only", "int4_native", "int8_dynamic_fbgemm")
Matmul = Callable[[torch.Tensor], torch.Tensor]


def make(method: str, w: torch.Tensor) -> Matmul:
    if method == "float32_packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if method == "bf16_packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 8)
        bf16 = torch.bfloat16
        return lambda x: torch.ops.mkldnn._linear_pointwise(x.to(bf16), packed, None, "none", [], "").float()
    if method == "int8_weight_only":
        q, scale = quantize_int8(w)
        scale = scale.to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).float()
    if method == "int4_weight_only":
        q, scale, offset = quantize_int4(w)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, GROUP_SIZE, sz
        ).float()
    if method == "int4_native":
        lib = cpu_int4.load()
        if lib is None:
            raise SystemExit("cpu_int4.c cannot run here (no C compiler or no AVX512-BF16)")
        packed4 = cpu_int4.pack(*quantize_int4(w))
        return lambda x: cpu_int4.matmul(lib, x.to(torch.bfloat16), packed4).float()
    if method == "int8_dynamic_fbgemm":
        _, scale = quantize_int8(w)
        with warnings.catch_warnings():  # quantized-tensor constructors warn of their deprecation
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(
                w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8
            )
            torch.backends.quantized.engine = "fbgemm"
            packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)
    raise ValueError(method)


def median_ms(fn: Callable[[], None], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_method(method: str, reps: int) -> dict[str, dict[str, float]]:
    """ms of one step's layers and of the head, per row count."""
    layers = [(make(method, torch.randn(n, k) * 0.02), k) for _ in range(NUM_LAYERS) for n, k in LAYER_SHAPES]
    head = make(method, torch.randn(*HEAD_SHAPE) * 0.02)
    out = {}
    for m in ROWS:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        step = median_ms(lambda xs=xs: [f(xs[k]) for f, k in layers], reps)
        head_ms = median_ms(lambda xs=xs: head(xs[576]), reps)
        out[str(m)] = {"layers_ms": step, "head_ms": head_ms, "total_ms": step + head_ms}
        print(f"{method:20s} rows {m:2d}: layers {step:7.2f} ms, head {head_ms:6.2f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--no-save", action="store_true")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    methods = ns.methods
    table = {method: time_method(method, ns.reps) for method in methods}
    if ns.no_save:
        return
    base = table[methods[0]]

    def cell(method: str) -> str:
        totals = "/".join(f"{table[method][str(m)]['total_ms']:.1f}" for m in ROWS)
        if method == methods[0]:
            return f"{method} {totals}"
        ratios = "/".join(f"{base[str(m)]['total_ms'] / table[method][str(m)]['total_ms']:.2f}" for m in ROWS)
        return f"{method} {totals} (x{ratios} faster)"

    summary = (
        f"one decode step's linears + LM head, ms at {'/'.join(map(str, ROWS))} rows, {torch.get_num_threads()} threads: "
        + "; ".join(map(cell, methods))
    )
    result = {
        "env": environment("cpu"),
        "num_layers": NUM_LAYERS,
        "layer_shapes": LAYER_SHAPES,
        "head_shape": HEAD_SHAPE,
        "ms": table,
    }
    print(f"wrote {write_result('cpu_quant_kernels', result, summary)}")


if __name__ == "__main__":
    main()
