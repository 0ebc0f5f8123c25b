"""A Triton matmul for decode-sized inputs: y = x @ W^T (+ bias) with few rows of x (M <= 64).

At decode a linear is a weight read; cuBLAS's small-M kernels leave some of the HBM bandwidth
unused and several add a split-K reduce launch. Here the operands are swapped (a slab of W's
rows is the dot's left side, x^T its right, padded to 16 columns), so each program streams its
rows of W once, several tiles in flight; when the output has too few rows of W to fill the GPU
the K axis is split too and the partial sums are added in a fixed order by a second launch
(deterministic, unlike atomics). Which (tile, split) to use per shape comes from `pick_config`,
whose table is the fastest setting of `fapool bench linear` on an H200.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fapool.layers.triton_pdl import launch_dependents, pdl_enabled, pdl_launch, wait_predecessor

MAX_ROWS = 64  # beyond this a linear is no longer a pure weight read; cuBLAS takes it


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int  # rows of W per program
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit
def activation(g, ACT: tl.constexpr):
    """GELU (exact, erf) / GELU (tanh approximation) / SiLU of float32 g; "" leaves g as is."""
    if ACT == "silu":
        g = g / (1.0 + tl.exp(-g))
    elif ACT == "gelu":
        g = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == "tanh":
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    return g


@triton.jit
def _output(acc, Y, ACT: tl.constexpr):
    """float32 sums -> Y's dtype; with ACT, activated after that rounding and rounded again, as
    torch applies an activation to the linear's rounded output."""
    y = acc.to(Y.dtype.element_ty)
    if ACT != "":
        y = activation(y.to(tl.float32), ACT).to(Y.dtype.element_ty)
    return y


@triton.jit
def _skinny_kernel(
    X,
    W,
    BIAS,
    Y,
    PART,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    k_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # whether K is split (the count is the grid's second axis)
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K == the split count * k_per_split (no masks)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_predecessor(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = W + offs_n[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = X + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]  # x^T [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs)
            xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        else:
            k_mask = (k + offs_k) < k_end
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    launch_dependents(USE_PDL)  # after the weight stream: the next kernel launches into its tail
    out_mask = n_mask[:, None] & m_mask[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + offs_m[None, :] * stride_ym + offs_n[:, None], _output(acc, Y, ACT), mask=out_mask)
    else:  # partial sums [SPLIT, M, N] float32
        p_ptrs = PART + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(p_ptrs, acc, mask=out_mask)


@triton.jit
def _split_sum_kernel(
    PART,
    BIAS,
    Y,
    M,
    N,
    stride_ym,
    split,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split):  # a fixed order: the same sums every run
        acc += tl.load(PART + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs, _output(acc, Y, ACT), mask=mask)


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> SkinnyConfig:
    """A reasonable setting for a shape the table does not list: 64 rows of W per program,
    K split until the grid covers the GPU about twice."""
    block_n, block_k = 64, 128
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split < 2 * num_sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return SkinnyConfig(block_n, block_k, split, num_warps=4, num_stages=4)


# (row bucket, N, K) -> the fastest setting of `fapool bench linear` on an H200 (row buckets:
# M <= 16, 16 < M <= 32, 32 < M <= 64). Shapes not listed stay on cuBLAS, as do those where
# cuBLAS measured faster or the best setting was within 2% of it (noise, not a measured win).
_C = SkinnyConfig
TUNED: dict[tuple[int, int, int], SkinnyConfig] = {
    # seed 000: qkv, o, up, down, LM head
    (16, 12288, 4096): _C(64, 128, 1, num_warps=4, num_stages=4),
    (16, 4096, 4096): _C(64, 256, 1, num_warps=4, num_stages=4),
    (16, 16384, 4096): _C(64, 128, 1, num_warps=4, num_stages=4),
    (16, 4096, 16384): _C(32, 256, 1, num_warps=4, num_stages=5),
    (16, 32000, 4096): _C(128, 128, 1, num_warps=4, num_stages=3),
    (32, 12288, 4096): _C(64, 128, 1, num_warps=4, num_stages=4),
    (32, 4096, 4096): _C(64, 256, 1, num_warps=4, num_stages=4),
    (32, 4096, 16384): _C(64, 128, 2, num_warps=4, num_stages=5),
    (32, 32000, 4096): _C(128, 128, 1, num_warps=4, num_stages=4),
    (64, 4096, 16384): _C(64, 128, 2, num_warps=4, num_stages=4),
    (64, 32000, 4096): _C(128, 128, 1, num_warps=4, num_stages=4),
    # Llama-3-8B shapes: qkv, down (o as seed 000's), gate_up
    (16, 6144, 4096): _C(64, 256, 1, num_warps=4, num_stages=4),
    (16, 4096, 14336): _C(32, 256, 1, num_warps=4, num_stages=5),
    (32, 6144, 4096): _C(64, 128, 1, num_warps=4, num_stages=5),
    (32, 28672, 4096): _C(64, 128, 1, num_warps=4, num_stages=4),
    (32, 4096, 14336): _C(64, 128, 2, num_warps=4, num_stages=5),
    (64, 28672, 4096): _C(64, 128, 1, num_warps=4, num_stages=3),
    (64, 4096, 14336): _C(64, 128, 2, num_warps=4, num_stages=5),
}


def row_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def pick_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The setting for a linear of this shape, None where cuBLAS is the faster choice (shapes the
    table does not list keep cuBLAS: an untuned setting is not a measured choice)."""
    return TUNED.get((row_bucket(m), n, k))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    act: str = "",
) -> torch.Tensor:
    """x [M, K] (M <= 64, rows contiguous), weight [N, K] contiguous -> [M, N] in x's dtype;
    `act` ("gelu", "tanh", "silu") applied to the rounded output, as torch would after it."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or x.stride(1) != 1 or not weight.is_contiguous() or weight.shape[1] != k:
        raise ValueError(
            f"skinny_linear wants x [<= {MAX_ROWS}, K] and a contiguous W [N, K]; got {x.shape}, {weight.shape}"
        )
    cfg = config or pick_config(m, n, k) or default_config(m, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    split = cfg.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    even = n % cfg.block_n == 0 and k == split * k_per_split
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    block_m = max(16, triton.next_power_of_2(m))
    has_bias = bias is not None
    pdl = pdl_enabled(x)
    _skinny_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x,
        weight,
        bias if has_bias else weight,
        y,
        part,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        k_per_split,
        HAS_BIAS=has_bias and split == 1,
        SPLIT=split > 1,
        EVEN=even,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        ACT=act,
        USE_PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(pdl),
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(m, triton.cdiv(n, block))](
            part,
            bias if has_bias else part,
            y,
            m,
            n,
            y.stride(0),
            split,
            HAS_BIAS=has_bias,
            BLOCK=block,
            ACT=act,
            USE_PDL=pdl,
            **pdl_launch(pdl),
        )
    return y
