"""Fused CPU kernels (cpu_fused.c) for the small ops around a quantized model's matmuls: the
residual add and RMSNorm, rotary embedding, SiLU-and-multiply. At decode sizes the torch
versions are dispatch-bound (rms_norm alone is six aten ops, ~30 us for 16 x 576 floats, where
one pass takes a few); they run on every layer of every step.

`fuse_cpu_model(model)` gives a quantized model's RMSNorm, Attention and MLP instances
subclasses whose methods take the fused path for CPU tensors of the dtypes the kernels were
written for and fall back to the parent's code otherwise (as fapool.layers.fused does on a
GPU). Only quantized models: the kernels round where the torch code rounds, but RMSNorm's sum
runs in another order, and the float32 path keeps HF's exact bits."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from fapool import native
from fapool.layers.norm import RMSNorm
from fapool.layers.swap import swap_classes
from fapool.models.llama import MLP, Attention

SOURCE = Path(__file__).with_name("cpu_fused.c")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.build(SOURCE)
    if lib is None or not lib.fapool_fused_supported():
        return None
    for name, args in (
        ("fapool_add_rms_norm", [_P, _P, _I, _P, _P, _P, _I, _I, _F]),
        ("fapool_rotary_bf16", [_P, _L, _I, _I, _I, _P, _P, _L, _P]),
        ("fapool_silu_mul_bf16", [_P, _L, _I, _I, _P]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib


def _rows(t: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """[T, n] with contiguous rows, on the CPU, of one of `dtypes`."""
    return t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.dtype in dtypes


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)), or (x, rms_norm(x)) without delta: x [T, H] float32
    contiguous, delta float32 or bf16 contiguous, weight float32 [H]."""
    y = torch.empty_like(x)
    s = torch.empty_like(x) if delta is not None else x
    load().fapool_add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(),
                               int(delta is not None and delta.dtype == torch.bfloat16), weight.data_ptr(),
                               s.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return s, y


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary for bf16 x [T, H, D] (heads contiguous, rows strided): a new contiguous tensor."""
    t, h, d = x.shape
    out = torch.empty(t, h, d, dtype=torch.bfloat16)
    rc = load().fapool_rotary_bf16(x.data_ptr(), x.stride(0), t, h, d, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                                   out.data_ptr())
    if rc != 0:
        raise ValueError(f"cpu_fused.rotary: head size {d} is not even or above 512")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """bf16 [T, 2F] (gate then up) -> silu(gate) * up [T, F], rounded as the torch ops round."""
    t, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, f, dtype=torch.bfloat16)
    load().fapool_silu_mul_bf16(gate_up.data_ptr(), gate_up.stride(0), t, f, out.data_ptr())
    return out


class CpuFusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x, torch.float32) and x.is_contiguous() and self.weight.dtype == torch.float32:
            return add_rms_norm(x, None, self.weight, self.eps)[1]
        return super().forward(x)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            _rows(x, torch.float32) and x.is_contiguous() and self.weight.dtype == torch.float32
            and _rows(delta, torch.float32, torch.bfloat16) and delta.is_contiguous() and delta.shape == x.shape
        ):
            return add_rms_norm(x, delta, self.weight, self.eps)
        return super().add_forward(x, delta)


class CpuFusedAttention(Attention):
    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and _rows(cos, torch.float32) and _rows(sin, torch.float32) and cos.stride(0) == sin.stride(0)
            and x.shape[2] % 2 == 0 and x.shape[2] <= 512
        ):
            return rotary(x, cos, sin)
        return super().rotate(x, cos, sin)


class CpuFusedMLP(MLP):
    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.act.name == "silu" and _rows(gate_up, torch.bfloat16):
            return silu_mul(gate_up)
        return super().act_and_mul(gate_up)


_FUSED = {RMSNorm: CpuFusedRMSNorm, Attention: CpuFusedAttention, MLP: CpuFusedMLP}


def fuse_cpu_model(model: nn.Module) -> int:
    """Switch the model's RMSNorm, Attention and MLP instances to their fused twins where the
    kernels run here; returns how many were switched."""
    return 0 if load() is None else swap_classes(model, _FUSED)
