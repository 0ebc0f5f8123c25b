"""Exact merge of two attention partials over disjoint KV, written straight into the rows of an
output (Triton, GPU): what `merge_partials` computes for two inputs, in one pass over the bytes
instead of several float32 temporaries. Test: tests/attention/test_triton_kernels.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge2_kernel(
    OA,
    LA,
    OB,
    LB,
    OUT,
    LSE,
    stride_oat,
    stride_oah,
    stride_obt,
    stride_obh,
    stride_ot,
    stride_oh,
    stride_lat,
    stride_lah,
    stride_lbt,
    stride_lbh,
    stride_lt,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hm = offs_h < num_heads
    mask = hm[:, None] & (offs_d < HEAD_DIM)[None, :]
    la = tl.load(LA + t * stride_lat + offs_h * stride_lah, mask=hm, other=float("-inf"))
    lb = tl.load(LB + t * stride_lbt + offs_h * stride_lbh, mask=hm, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # neither side saw KV: weights 0, out 0, lse -inf
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    oa = tl.load(OA + t * stride_oat + offs_h[:, None] * stride_oah + offs_d[None, :], mask=mask, other=0.0)
    ob = tl.load(OB + t * stride_obt + offs_h[:, None] * stride_obh + offs_d[None, :], mask=mask, other=0.0)
    seen = total > 0.0
    o = (oa.to(tl.float32) * wa[:, None] + ob.to(tl.float32) * wb[:, None]) / tl.where(seen, total, 1.0)[:, None]
    tl.store(OUT + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + t * stride_lt + offs_h, tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=hm)


def merge_two_into(
    out_a: torch.Tensor,  # [T, H, D], last dim contiguous
    lse_a: torch.Tensor,  # [T, H] float32, any strides
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor,  # [T, H, D] destination rows (a view of the backend's output)
    lse: torch.Tensor,  # [T, H] float32 destination, last dim contiguous
) -> None:
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens == 0:
        return
    for name, x in (("out_a", out_a), ("out_b", out_b), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"merge_two_into: {name}'s head_dim must be contiguous")
    if lse.stride(-1) != 1:
        raise ValueError("merge_two_into: lse's head axis must be contiguous")
    _merge2_kernel[(num_tokens,)](
        out_a,
        lse_a,
        out_b,
        lse_b,
        out,
        lse,
        out_a.stride(0),
        out_a.stride(1),
        out_b.stride(0),
        out_b.stride(1),
        out.stride(0),
        out.stride(1),
        lse_a.stride(0),
        lse_a.stride(1),
        lse_b.stride(0),
        lse_b.stride(1),
        lse.stride(0),
        num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
