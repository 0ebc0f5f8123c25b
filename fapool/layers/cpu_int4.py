"""The int4 weight-only matmul of cpu_int4.c for decode-sized row counts: the weight in
llama.cpp's Q4_1 form (q in 0..15, a float32 scale and offset per 32 input channels) packed
once into the kernel's tile layout. `load()` is None where the kernel cannot run (no C
compiler, or a CPU without AVX512-BF16); callers keep aten's int4 kernel then."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from fapool import native

SOURCE = Path(__file__).with_name("cpu_int4.c")
GROUP = 32  # input channels per scale and offset, as in cpu_int4.c
TILE = 16  # output columns per tile
MAX_ROWS = 64  # as MAX_M in cpu_int4.c


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.build(SOURCE)
    if lib is None or not lib.fapool_int4_supported():
        return None
    fn = lib.fapool_int4_matmul
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    return lib


@dataclass(frozen=True)
class PackedInt4:
    """[N, K] int4 weight in the kernel's layout: bytes [N/16, K/32, 8, 32], scale and offset
    [N/16, K/32, 16] float32."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    out_features: int
    in_features: int


def pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> PackedInt4:
    """q [N, K] integers in 0..15, scale / offset [N, K/32] (w = scale * q + offset) -> the
    kernel's layout: in each 16-column tile and group, byte 2c + h of pair p holds column c's
    q at k = 2p + h (low nibble) and k = 16 + 2p + h (high nibble)."""
    n, k = q.shape
    if n % TILE or k % GROUP:
        raise ValueError(f"int4 kernel needs out features a multiple of {TILE} and in features of {GROUP}, got {n}x{k}")
    tiles, groups = n // TILE, k // GROUP
    # [tile, c, group, half, p, h] -> [tile, group, p, c, h, half]
    q6 = q.to(torch.uint8).view(tiles, TILE, groups, 2, 8, 2).permute(0, 2, 4, 1, 5, 3)
    data = (q6[..., 0] | (q6[..., 1] << 4)).contiguous().view(tiles, groups, 8, 2 * TILE)

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.float().view(tiles, TILE, groups).transpose(1, 2).contiguous()

    return PackedInt4(data, per_tile(scale), per_tile(offset), n, k)


def matmul(lib: ctypes.CDLL, x: torch.Tensor, w: PackedInt4) -> torch.Tensor:
    """x [M, K] -> x @ W^T [M, N] bf16: x rounded to bf16 (a float32 x in the kernel), the
    products summed in float32, MAX_ROWS rows a call."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.to(torch.bfloat16)
    x = x.contiguous()
    f32 = int(x.dtype == torch.float32)
    y = torch.empty(x.shape[0], w.out_features, dtype=torch.bfloat16)
    data, scale, offset = w.data.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr()
    for start in range(0, x.shape[0], MAX_ROWS):
        xs, ys = x[start : start + MAX_ROWS], y[start : start + MAX_ROWS]
        rc = lib.fapool_int4_matmul(xs.data_ptr(), f32, xs.shape[0], w.in_features, data, scale, offset,
                                    w.out_features, ys.data_ptr())
        if rc == -2:
            raise MemoryError("cpu_int4: no memory to round the input to bf16")
        if rc != 0:
            raise ValueError(f"cpu_int4: sizes out of range ({xs.shape[0]} rows, {w.out_features}x{w.in_features})")
    return y
