"""Block summaries (per-block key min/max) updated in one Triton launch, with no host sync.

    update_summaries_triton(k_cache, slot_mapping, kmin, kmax)

Same rule as the torch reference SparseAttentionBackend.update_summaries: every block the step
wrote is summarised from offset 0 to the last offset written, so a reused, copied-on-write or
partly filled block is summarised from what it holds now. The reference finds those blocks
with torch.unique (a host sync); here one program per token checks whether it is the last
token of the step in its block: the tokens of a sequence are contiguous in the flat batch and
fill consecutive slots, and no two sequences write one block in a step (a shared block is
copied before it is written), so token t is the last in its block iff its offset is the block's
last, or it is the batch's last token, or token t+1 is not in slot + 1. That program reads the
block's keys [0, offset] ([block_size, Hkv x D], masked) and writes their min and max. Slot -1
(not stored here, or a graph's padding row) is skipped.

Call it after the step's KV write (stream order makes the new keys visible).
Reference: SparseAttentionBackend.update_summaries; test: tests/sparse/test_triton_select.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _summary_kernel(
    K,
    SLOTS,
    KMIN,
    KMAX,
    num_tokens,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,  # Hkv x D, padded to a power of two
    NUM_COLS: tl.constexpr,  # Hkv x D
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t)
    if slot < 0:
        return
    off = slot % PAGE
    is_last = (off == PAGE - 1) | (t == num_tokens - 1)
    if not is_last:
        nxt = tl.load(SLOTS + t + 1)
        is_last = nxt != slot + 1
    if is_last:
        block = (slot // PAGE).to(tl.int64)
        offs_t = tl.arange(0, PAGE)
        cols = tl.arange(0, ROW)
        h = cols // HEAD_DIM
        d = cols % HEAD_DIM
        c_mask = cols < NUM_COLS
        mask = (offs_t[:, None] <= off) & c_mask[None, :]
        ptr = K + block * stride_kb + offs_t[:, None] * stride_kt + (h * stride_kh + d)[None, :]
        lo = tl.min(tl.load(ptr, mask=mask, other=float("inf")), 0)
        hi = tl.max(tl.load(ptr, mask=mask, other=float("-inf")), 0)
        out = block * stride_sb + h * stride_sh + d
        tl.store(KMIN + out, lo.to(KMIN.dtype.element_ty), mask=c_mask)
        tl.store(KMAX + out, hi.to(KMAX.dtype.element_ty), mask=c_mask)


@torch.no_grad()
def update_summaries_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    kmin: torch.Tensor,  # [num_blocks, Hkv, D], k_cache's dtype
    kmax: torch.Tensor,
) -> None:
    num_blocks, page, num_kv_heads, head_dim = k_cache.shape
    want = (num_blocks, num_kv_heads, head_dim)
    if tuple(kmin.shape) != want or kmax.shape != kmin.shape or kmin.stride() != kmax.stride():
        raise ValueError(f"kmin/kmax must both be {list(want)} with equal strides, got {tuple(kmin.shape)}")
    if kmin.dtype != k_cache.dtype or kmax.dtype != k_cache.dtype:
        raise ValueError(f"summaries must have the cache's dtype {k_cache.dtype}, got {kmin.dtype}")
    if k_cache.stride(3) != 1 or kmin.stride(2) != 1:
        raise ValueError("the head dimension of the cache and the summaries must be contiguous")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be 1-D int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    cols = num_kv_heads * head_dim
    row = triton.next_power_of_2(cols)
    _summary_kernel[(num_tokens,)](
        k_cache,
        slot_mapping,
        kmin,
        kmax,
        num_tokens,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        kmin.stride(0),
        kmin.stride(1),
        HEAD_DIM=head_dim,
        ROW=row,
        NUM_COLS=cols,
        PAGE=page,
        num_warps=4 if page * row <= 8192 else 8,
    )
