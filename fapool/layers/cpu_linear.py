"""Linears on the CPU through oneDNN with weights packed once (as torch.compile's CPU freezing
does), instead of MKL's sgemm.

MKL's sgemm on the AMD EPYC CPUs this project runs on takes twice as long for 2-16 rows as for
one (a decode batch of 8 reads every weight at half the memory bandwidth); oneDNN's kernels on
weights reordered for a small batch do not (benchmarks/RESULTS.md). bfloat16 too where oneDNN
has bf16 kernels for the CPU (AVX512-BF16 or AMX); other dtypes keep torch's own linear.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from fapool.layers.linear import MergedLinear

DECODE_BATCH_HINT = 8  # rows the packed layout is chosen for (it serves every row count)


class _Packed:
    """forward through the packed copy of the weight (the dense one is dropped)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


class PackedLinear(_Packed, nn.Linear):
    pass


class PackedMergedLinear(_Packed, MergedLinear):
    pass


_PACKED = {nn.Linear: PackedLinear, MergedLinear: PackedMergedLinear}


def can_pack(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_supported())


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """oneDNN has native bf16 matmuls on this CPU (else its bf16 path emulates them, slowly)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_fn(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T as the engine's linears compute it where `weight` lives (packed on
    the CPU): what kernel timings (fapool calibrate) must time."""
    if weight.device.type == "cpu" and can_pack(weight.dtype):
        packed = pack(weight)
        return lambda x: packed_linear(x, packed)
    return lambda x: torch.nn.functional.linear(x, weight)


def pack_linears(model: nn.Module) -> int:
    """Switch every float32 linear of `model` to its packed twin; a weight shared with another
    module (a tied LM head) is packed as a copy and kept. Returns how many were packed."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    n = 0
    for module in model.modules():
        cls = _PACKED.get(type(module))
        if cls is None or not can_pack(module.weight.dtype):
            continue
        weight = module.weight.detach()
        module.packed_weight = pack(weight)
        if owners[id(module.weight)] == 1:
            module.weight.data = torch.empty(0, dtype=weight.dtype)  # the packed copy replaces it
        module.__class__ = cls
        n += 1
    return n


def pack_for_device(module: nn.Module, device: torch.device) -> int:
    """pack_linears where the module computes on the CPU (a rank's shard, once its weights are final)."""
    return pack_linears(module) if device.type == "cpu" else 0
