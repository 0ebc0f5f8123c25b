"""Weight-only quantized linears on the CPU (EngineConfig.quantization), through PyTorch's own
CPU kernels, chosen by measurement on the embedded model's shapes (benchmarks/RESULTS.md):

  int4: 4-bit weights in groups of GROUP_SIZE input channels, a scale and an offset per group
        (`w = scale * q + offset`, q in 0..15): llama.cpp's Q4_1 layout, so a Q4_1 GGUF's
        weights are recovered exactly from their float32 dequantization. fapool's own kernel
        (cpu_int4.c) on CPUs with AVX512-BF16, else aten's `_weight_int4pack_mm_for_cpu`.
  int8: symmetric int8 per output channel. aten's `_weight_int8pack_mm`.

Both kernels take bfloat16 activations (their fast path), so x is rounded to bf16 on the way in
and the result stays in the kernel's bf16: what reads a linear's output (rotary, attention, the
activation and product, the next linear) computes in bf16 without a round trip through
float32, while the residual stream and the norms keep the model's dtype (an add promotes).
Activations stay unquantized: this model's outlier activations rule out dynamic int8
(benchmarks/RESULTS.md).

The LM head's logits decide greedy tokens, so its quantized product (bf16, or int8 on a CPU
without bf16 matmuls, under either scheme) only ranks the vocabulary: the RESCORE_TOP_K
best tokens of each row get their logits again from the float weight (for a tied head the
embedding table, which stays exact for the lookup anyway). Greedy then matches the float head
unless the true best token falls outside the quantized top k.
"""

from __future__ import annotations

import torch
from torch import nn

from fapool.config import QUANTIZATIONS, ConfigError
from fapool.layers import cpu_int4
from fapool.layers.cpu_linear import bf16_supported, pack, packed_linear
from fapool.layers.linear import MergedLinear
from fapool.layers.row_reduce import row_topk_indices

GROUP_SIZE = 32  # int4 group: llama.cpp's Q4_0 / Q4_1 block
RESCORE_TOP_K = 16  # LM head: tokens per row whose logits are recomputed from the float weight
# Rows up to which the quantized kernel beats the packed bf16 copy (benchmarks/RESULTS.md, cpu_quant_kernels).
MAX_QUANTIZED_ROWS = 8  # aten's int8 and int4 kernels
MAX_NATIVE_INT4_ROWS = 64  # cpu_int4.c


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scale [N]) with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    w: torch.Tensor, group: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int32 [N, K] in 0..15, scale [N, K/group], offset [N, K/group]) with
    w ~= scale * q + offset per group; offset is the group's minimum, as llama.cpp's Q4_1."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, low


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The plain-torch inverse of quantize_int4 (the reference the kernel is tested against)."""
    n, k = q.shape
    groups = scale.shape[1]
    return (q.view(n, groups, k // groups).float() * scale[..., None] + offset[..., None]).view(n, k)


class _Quantized:
    """forward through the quantized copy of the weight; the dense one is dropped (or, for the
    LM head, kept for rescoring). More than `max_quantized_rows` rows (a prefill) go through a
    packed bf16 copy where the CPU has bf16 matmuls: the weight-only kernels run several times
    slower than oneDNN's bf16 GEMM there."""

    bf16_weight: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    native_int4: cpu_int4.PackedInt4 | None = None
    max_quantized_rows = MAX_QUANTIZED_ROWS

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        many = rows.shape[0] > self.max_quantized_rows
        if self.native_int4 is not None and (not many or self.bf16_weight is None):
            y = cpu_int4.matmul(cpu_int4.load(), rows, self.native_int4)  # rounds a float32 x itself
        else:
            rows = rows.to(torch.bfloat16)
            if self.bf16_weight is not None and (many or self.qweight is None):
                y = packed_linear(rows, self.bf16_weight)
            elif self.scheme == "int8":
                y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.qscale)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, GROUP_SIZE, self.qscale)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_matmul(x)


class QuantizedLinear(_Quantized, nn.Linear):
    pass


class QuantizedMergedLinear(_Quantized, MergedLinear):
    pass


class QuantizedHead(_Quantized, nn.Linear):
    """The LM head: quantized logits, the top RESCORE_TOP_K of each row recomputed exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.quantized_matmul(x).to(x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        flat = logits.view(-1, logits.shape[-1])
        top = row_topk_indices(flat, min(RESCORE_TOP_K, flat.shape[-1]))  # [rows, k]
        exact = torch.einsum("rh,rkh->rk", rows, self.weight[top])
        if self.bias is not None:
            exact = exact + self.bias[top]
        return flat.scatter_(1, top, exact.to(flat.dtype)).view_as(logits)


_QUANTIZED = {nn.Linear: QuantizedLinear, MergedLinear: QuantizedMergedLinear}


def quantized_kv_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype under quantization ("auto"): bf16 where the CPU has bf16 matmuls.
    The quantized qkv projection already rounds K and V to bf16 (only rotary touches K after
    it), and a bf16 cache halves the bytes decode attention gathers and reads."""
    return torch.bfloat16 if bf16_supported() else model_dtype


def check_shape(scheme: str, name: str, out_features: int, in_features: int) -> None:
    """A ConfigError naming the option when the kernel cannot take this weight."""
    if scheme == "int4" and (in_features % GROUP_SIZE or out_features % 16):
        raise ConfigError(
            f"quantization int4 needs linears with input features a multiple of {GROUP_SIZE} and output "
            f"features a multiple of 16; {name} is {out_features}x{in_features} (try quantization int8)"
        )


def _row_chunks(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row blocks of about 512 KB of float32: quantizing a block while it sits in cache is over
    10x faster than each elementwise pass sweeping the whole weight. Multiples of 64 rows: the
    int4 packing lays rows out in blocks of 64, so only such blocks pack as the whole does."""
    rows = max(64, (1 << 19) // (4 * w.shape[1]) // 64 * 64)
    return w.split(rows)


def quantize_module(module: nn.Linear, scheme: str, cls: type) -> None:
    """Give `module` its quantized weight and switch it to `cls`."""
    chunks = _row_chunks(module.weight.detach())
    if scheme == "int8":
        qs, scales = zip(*(quantize_int8(c) for c in chunks))
        module.qweight = torch.cat(qs)
        module.qscale = torch.cat(scales).to(torch.bfloat16)
    elif scheme == "int4" and cpu_int4.load() is not None:
        qs, scales, offsets = [], [], []
        for chunk in chunks:
            q, scale, offset = quantize_int4(chunk)
            qs.append(q.to(torch.uint8))
            scales.append(scale)
            offsets.append(offset)
        module.native_int4 = cpu_int4.pack(torch.cat(qs), torch.cat(scales), torch.cat(offsets))
        module.max_quantized_rows = MAX_NATIVE_INT4_ROWS
    elif scheme == "int4":
        packed, scales = [], []
        for chunk in chunks:
            q, scale, offset = quantize_int4(chunk)
            # The kernel's form: (q - 8) * scale + zero per group, as [K/group, N, 2].
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
            scales.append(torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1))
        module.qweight = torch.cat(packed)
        module.qscale = torch.cat(scales, dim=1).to(torch.bfloat16).contiguous()
    elif scheme != "bf16":
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {scheme!r}")
    if scheme == "bf16" or (cls is not QuantizedHead and bf16_supported()):
        module.bf16_weight = pack(module.weight.detach().to(torch.bfloat16))
    module.scheme = scheme
    module.__class__ = cls


def quantize_linears(model: nn.Module, scheme: str) -> int:
    """Switch every linear of `model` to its `scheme` twin; `model.lm_head`, if there is one,
    becomes a QuantizedHead (bf16 where the CPU has bf16 matmuls: oneDNN's bf16 GEMM beats
    aten's int8 kernel on the head at every row count; else int8) that keeps its float weight
    (shared with the embedding when tied). Returns how many were quantized."""
    head = getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if module is not head and type(module) in _QUANTIZED:
            check_shape(scheme, name, module.out_features, module.in_features)
    n = 0
    for module in list(model.modules()):
        if module is head:
            quantize_module(module, "bf16" if bf16_supported() else "int8", QuantizedHead)
        elif type(module) in _QUANTIZED:
            quantize_module(module, scheme, _QUANTIZED[type(module)])
            module.weight.data = torch.empty(0, dtype=module.weight.dtype)  # the quantized copy replaces it
        else:
            continue
        n += 1
    return n
