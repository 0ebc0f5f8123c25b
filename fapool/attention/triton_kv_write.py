"""KV-cache write in Triton: scatter the step's new K and V rows into their paged slots.

One program per token moves that token's K and V rows ([num_kv_heads, head_dim] each) in one
launch; slot -1 (stored on another worker) is skipped inside the kernel, so unlike the torch
reference (`write_kv_torch`, which filters the -1 slots on the host) nothing syncs with the host
and the call can be captured in a CUDA graph. Into an FP8 cache the rows go divided by the
layer's scales and saturated to e4m3's range; into an int8 cache each KV head's row goes over
its own max |x| / 127, that scale stored in the scale pages; into either, K less its
channel means first (fapool.attention.kv_quant).

Reference: `fapool.attention.torch_ref.write_kv_torch`; test:
tests/attention/test_triton_kernels.py; benchmark: benchmarks/bench_attention_kernels.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fapool.attention.kv_quant import FP8_DTYPE, FP8_MAX, INT8_MAX, KVScales, check_scale_pages, check_shift
from fapool.layers.triton_pdl import launch_dependents, pdl_enabled, pdl_launch, wait_predecessor

FP8_MAX_C = tl.constexpr(FP8_MAX)
INT8_MAX_C = tl.constexpr(INT8_MAX)


@triton.jit
def _int8_rows(x, SCALES, page, off, offs_h, h_mask, NUM_KV_HEADS: tl.constexpr, PAGE: tl.constexpr):
    """x [heads, D] -> each row over its own max |x| / 127, rounded half up (kv_quant's
    quantize_int8_rows); the scales go to SCALES[page, head, off]."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    inv = tl.where(amax > 0.0, INT8_MAX_C / amax, 0.0)
    tl.store(SCALES + (page * NUM_KV_HEADS + offs_h) * PAGE + off, amax / INT8_MAX_C, mask=h_mask)
    return tl.clamp(tl.floor(xf * inv[:, None] + 0.5), -INT8_MAX_C, INT8_MAX_C)


@triton.jit
def _write_kv_kernel(
    KEY,
    VALUE,
    K_CACHE,
    V_CACHE,
    slot_mapping,
    k_inv_scale,
    v_inv_scale,
    K_SCALES,
    V_SCALES,
    K_SHIFT,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_db,
    stride_dt,
    stride_dh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
    INT8: tl.constexpr,
    SHIFT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    page = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)[None, :]
    h_mask = h < NUM_KV_HEADS
    mask = h_mask[:, None]
    k = tl.load(KEY + t * stride_kt + h[:, None] * stride_kh + d, mask=mask)
    v = tl.load(VALUE + t * stride_vt + h[:, None] * stride_vh + d, mask=mask)
    if SHIFT:
        k = k.to(tl.float32) - tl.load(K_SHIFT + h[:, None] * HEAD_DIM + d, mask=mask, other=0.0)
    if FP8:
        k = tl.clamp(k.to(tl.float32) * k_inv_scale, -FP8_MAX_C, FP8_MAX_C)
        v = tl.clamp(v.to(tl.float32) * v_inv_scale, -FP8_MAX_C, FP8_MAX_C)
    if INT8:
        k = _int8_rows(k, K_SCALES, page, off, h, h_mask, NUM_KV_HEADS, PAGE)
        v = _int8_rows(v, V_SCALES, page, off, h, h_mask, NUM_KV_HEADS, PAGE)
    tl.store(
        K_CACHE + page * stride_cb + off * stride_ct + h[:, None] * stride_ch + d,
        k.to(K_CACHE.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        V_CACHE + page * stride_db + off * stride_dt + h[:, None] * stride_dh + d,
        v.to(V_CACHE.dtype.element_ty),
        mask=mask,
    )


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    scales: KVScales | None = None,  # an 8-bit cache's (kv_quant)
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape[2:] != key.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"shape mismatch: key {key.shape}, value {value.shape}, caches {k_cache.shape}/{v_cache.shape}"
        )
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be [num_tokens] int64, got {slot_mapping.shape} {slot_mapping.dtype}"
        )
    if key.stride(2) != 1 or value.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("head_dim must be the contiguous dimension of key, value and caches")
    int8 = k_cache.dtype == torch.int8
    shift = scales.k_shift if scales is not None else None
    check_shift(k_cache, shift)
    if int8:
        check_scale_pages(k_cache, scales and scales.k_pages, scales and scales.v_pages)
    if num_tokens == 0:
        return
    if head_dim & (head_dim - 1):
        raise ValueError(f"write_kv needs a power-of-two head_dim, got {head_dim}")
    pdl = pdl_enabled(key)
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / scales.k if scales else 1.0,
        1.0 / scales.v if scales else 1.0,
        scales.k_pages if int8 else k_cache,
        scales.v_pages if int8 else v_cache,
        shift if shift is not None else k_cache,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        PAGE=k_cache.shape[1],
        FP8=k_cache.dtype == FP8_DTYPE,
        INT8=int8,
        SHIFT=shift is not None,
        USE_PDL=pdl,
        num_warps=4,
        **pdl_launch(pdl),
    )
