"""Block summaries (per-block key min/max) in one Triton launch, with no host sync; optionally
fused with the step's KV write.

    write_kv_and_summaries(k_cache, v_cache, key, value, slot_mapping, kmin, kmax)
    update_summaries_triton(k_cache, slot_mapping, kmin, kmax)      (the KV already written)

Same result as the torch reference SparseAttentionBackend.update_summaries: every block the step
wrote is summarised from offset 0 to the last offset written. The reference finds those blocks
with torch.unique (a host sync); here one program per token checks whether it is the last
token of the step in its block: the tokens of a sequence are contiguous in the flat batch and
fill consecutive slots, and no two sequences write one block in a step (a shared block is
copied before it is written), so token t is the last in its block iff its offset is the block's
last, or it is the batch's last token, or token t+1 is not in slot + 1. That program writes the
min and max of the block's keys [0, offset]. Slot -1 (not stored here, or a graph's padding
row) is skipped.

Fused with the write (one launch instead of two per layer and step, which is what a decode step
of a small model waits on): every program stores its token's K/V rows as
fapool.attention.triton_kv_write does, and the block's last program of the step updates the
summary incrementally: min/max of the step's new keys in the block (offsets first..off, from the
key rows, since other programs of the same launch store them) and, if first > 0, of the summary
as it was (it covers offsets 0..first-1: every write goes through here, and copy-on-write copies
a block's summary with its KV, SparseAttentionBackend.copy_block_state). A decode row reads only
its own key and the old summary, both right after its slot: no load waits on another. All in the
cache's dtype, so the summary is of what the cache holds. update_summaries_triton (the KV
written by another kernel) recomputes offsets 0..off from the cache, as the reference does.

Reference: SparseAttentionBackend.update_summaries with write_kv_torch; test:
tests/sparse/test_triton_select.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _summary_kernel(
    KEY,
    VALUE,
    K,
    V,
    SLOTS,
    KMIN,
    KMAX,
    num_tokens,
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
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,  # Hkv x D, padded to a power of two
    NUM_COLS: tl.constexpr,  # Hkv x D
    PAGE: tl.constexpr,
    WRITE: tl.constexpr,  # store the step's K/V first (fused KV write)
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t)
    if slot < 0:
        return
    block = (slot // PAGE).to(tl.int64)
    off = slot % PAGE
    cols = tl.arange(0, ROW)
    h = cols // HEAD_DIM
    d = cols % HEAD_DIM
    c_mask = cols < NUM_COLS
    cache_cols = h * stride_ch + d
    if WRITE:
        k = tl.load(KEY + t * stride_kt + h * stride_kh + d, mask=c_mask)
        v = tl.load(VALUE + t * stride_vt + h * stride_vh + d, mask=c_mask)
        tl.store(K + block * stride_cb + off * stride_ct + cache_cols, k.to(K.dtype.element_ty), mask=c_mask)
        dst = V + block * stride_db + off * stride_dt + h * stride_dh + d
        tl.store(dst, v.to(V.dtype.element_ty), mask=c_mask)
    nxt = tl.load(SLOTS + t + 1, mask=t + 1 < num_tokens, other=-1)
    if WRITE:
        # Incremental: the block's summary already covers offsets [0, first) (every earlier write
        # went through here, and a copied-on-write block's summary is copied with it), so only
        # this step's rows [first, off] are new. A decode row is alone in its block (the
        # previous token did not write slot - 1): its own key is in registers, nothing else is
        # read, and the old summary loads beside the key rows; no dependent round trip.
        prv = tl.load(SLOTS + t - 1, mask=t > 0, other=-1)
        last = (off == PAGE - 1) | (nxt != slot + 1)  # the step's last token in this block
        out = block * stride_sb + h * stride_sh + d
        old_lo = tl.load(KMIN + out, mask=c_mask & (off > 0) & last, other=float("inf"))
        old_hi = tl.load(KMAX + out, mask=c_mask & (off > 0) & last, other=float("-inf"))
        if last:
            # In float32 (exact for the cache's values; reductions of 16-bit types widen to it).
            kc = k.to(K.dtype.element_ty).to(tl.float32)
            lo = tl.where(c_mask, kc, float("inf"))
            hi = tl.where(c_mask, kc, float("-inf"))
            if prv == slot - 1:  # earlier rows of this step in the block (a prefill chunk)
                offs_o = tl.arange(0, PAGE)
                src = t - (off - offs_o)  # the token that would have written offset o this step
                src_ok = (offs_o < off) & (src >= 0)
                src_slot = tl.load(SLOTS + src, mask=src_ok, other=-1)
                mine = src_ok & (src_slot == slot - (off - offs_o))
                new = tl.load(
                    KEY + src[:, None] * stride_kt + (h * stride_kh + d)[None, :],
                    mask=mine[:, None] & c_mask[None, :],
                    other=0.0,
                ).to(K.dtype.element_ty).to(tl.float32)
                m2 = mine[:, None] & c_mask[None, :]
                lo = tl.minimum(lo, tl.min(tl.where(m2, new, float("inf")), 0))
                hi = tl.maximum(hi, tl.max(tl.where(m2, new, float("-inf")), 0))
                first = tl.min(tl.where(mine, offs_o, off), 0)
            else:
                first = off
            keep = first > 0  # offsets before the step's first in the block: the old summary
            lo = tl.where(keep, tl.minimum(lo, old_lo.to(tl.float32)), lo)
            hi = tl.where(keep, tl.maximum(hi, old_hi.to(tl.float32)), hi)
            tl.store(KMIN + out, lo.to(KMIN.dtype.element_ty), mask=c_mask)
            tl.store(KMAX + out, hi.to(KMAX.dtype.element_ty), mask=c_mask)
    elif (off == PAGE - 1) | (nxt != slot + 1):  # recompute [0, off] from the cache
        offs_o = tl.arange(0, PAGE)
        mask = (offs_o <= off)[:, None] & c_mask[None, :]
        keys = tl.load(
            K + block * stride_cb + offs_o[:, None] * stride_ct + cache_cols[None, :], mask=mask, other=0.0
        )
        lo = tl.min(tl.where(mask, keys, float("inf")), 0)
        hi = tl.max(tl.where(mask, keys, float("-inf")), 0)
        out = block * stride_sb + h * stride_sh + d
        tl.store(KMIN + out, lo.to(KMIN.dtype.element_ty), mask=c_mask)
        tl.store(KMAX + out, hi.to(KMAX.dtype.element_ty), mask=c_mask)


def _check(k_cache, v_cache, slot_mapping, kmin, kmax) -> None:
    num_blocks, page, num_kv_heads, head_dim = k_cache.shape
    want = (num_blocks, num_kv_heads, head_dim)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache {tuple(k_cache.shape)}"
        )
    if tuple(kmin.shape) != want or kmax.shape != kmin.shape or kmin.stride() != kmax.stride():
        raise ValueError(f"kmin/kmax must both be {list(want)} with equal strides, got {tuple(kmin.shape)}")
    if kmin.dtype != k_cache.dtype or kmax.dtype != k_cache.dtype:
        raise ValueError(f"summaries must have the cache's dtype {k_cache.dtype}, got {kmin.dtype}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or kmin.stride(2) != 1:
        raise ValueError("the head dimension of the caches and the summaries must be contiguous")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be 1-D int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")


def _launch(k_cache, v_cache, key, value, slot_mapping, kmin, kmax, write: bool) -> None:
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, page, num_kv_heads, head_dim = k_cache.shape
    cols = num_kv_heads * head_dim
    row = triton.next_power_of_2(cols)
    _summary_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        kmin,
        kmax,
        num_tokens,
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
        kmin.stride(0),
        kmin.stride(1),
        HEAD_DIM=head_dim,
        ROW=row,
        NUM_COLS=cols,
        PAGE=page,
        WRITE=write,
        num_warps=4 if page * row <= 8192 else 8,
    )


@torch.no_grad()
def write_kv_and_summaries(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    key: torch.Tensor,  # [num_tokens, Hkv, D]
    value: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    kmin: torch.Tensor,  # [num_blocks, Hkv, D], the cache's dtype
    kmax: torch.Tensor,
) -> None:
    """The step's KV write (fapool.attention.triton_kv_write.write_kv) and the summaries of the
    blocks it wrote, in one launch."""
    _check(k_cache, v_cache, slot_mapping, kmin, kmax)
    num_tokens = slot_mapping.shape[0]
    if key.shape != (num_tokens, *k_cache.shape[2:]) or value.shape != key.shape:
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} must be [{num_tokens}, "
            f"{k_cache.shape[2]}, {k_cache.shape[3]}]"
        )
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("the head dimension of key and value must be contiguous")
    _launch(k_cache, v_cache, key, value, slot_mapping, kmin, kmax, write=True)


@torch.no_grad()
def update_summaries_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], the step's KV already written
    slot_mapping: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
) -> None:
    """The summaries alone (for a KV written by another kernel earlier in the stream)."""
    _check(k_cache, k_cache, slot_mapping, kmin, kmax)
    # key/value are not read without WRITE: the cache stands in for their pointers and strides.
    flat = k_cache.view(-1, *k_cache.shape[2:])
    _launch(k_cache, k_cache, flat, flat, slot_mapping, kmin, kmax, write=False)
