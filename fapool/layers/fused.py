"""Fused GPU kernels for the small ops around the matmuls: RMSNorm (with the residual add before
it), rotary embedding, activation-times-up, and the row gathers of the embedding and the rotary
table; and the decode-sized linears through the Triton small-M matmul (layers/triton_linear.py),
with a non-gated MLP's activation in its epilogue. Each replaces a chain of torch kernels by one.

Why: inside a CUDA-graphed decode step the weights dominate the bytes, but every kernel still
costs a couple of microseconds of launch and drain; the torch versions of these three ops add
about 25 kernels per layer (rms_norm alone: cast, pow, mean, add, rsqrt, mul, cast, mul).

Each kernel rounds where the torch code it replaces rounds (fapool.layers.norm.rms_norm,
fapool.layers.rotary.apply_rotary, Activation then `*`), so bf16 results stay within one
rounding of the unfused model's.

`fuse_model(model)` rewrites a built model after the fact (as gpt-fast's apply_tp rewrites
linears): RMSNorm, Attention, MLP, linear, embedding and rotary-table instances get subclasses
whose forward takes the fused path for CUDA tensors and falls back to the parent's code
otherwise, so the model file stays kernel-agnostic and the CPU path is untouched.
`unfuse_model` undoes it (benchmarks A/B). Tests: tests/worker/test_cuda_graphs.py and
tests/layers/test_triton_linear.py (GPU); benchmark: fapool bench tpot (A/B points).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from fapool.layers.linear import MergedLinear
from fapool.layers.norm import RMSNorm
from fapool.layers.rotary import RotaryEmbedding, apply_rotary
from fapool.layers.swap import swap_classes
from fapool.layers.triton_linear import MAX_ROWS, SkinnyConfig, activation, pick_config, skinny_linear
from fapool.layers.triton_pdl import launch_dependents, pdl_enabled, pdl_launch, wait_predecessor
from fapool.models.llama import MLP, Attention


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    xn = (x * rstd).to(Y.dtype.element_ty)  # normalise in fp32, round to the input dtype ...
    w = tl.load(W + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * xn.to(tl.float32)  # ... then scale, as HF does
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    X, D, W, S, Y, stride_x, stride_d, stride_s, stride_y, n_cols, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(D + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + d).to(S.dtype.element_ty)  # the residual sum, rounded as torch's `x + d` rounds it
    tl.store(S + row * stride_s + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / n_cols + eps)
    xn = (sf * rstd).to(Y.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(
        Y + row * stride_y + offs, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask
    )


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(
            f"rms_norm wants [T, hidden] with weight of its dtype, got {x.shape} {x.dtype}/{weight.dtype}"
        )


def _norm_launch(x: torch.Tensor) -> dict:
    block = triton.next_power_of_2(x.shape[1])
    pdl = pdl_enabled(x)
    return {"BLOCK": block, "num_warps": min(16, max(1, block // 256)), "USE_PDL": pdl, **pdl_launch(pdl)}


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [T, hidden] -> (x + delta, rms_norm(x + delta)), one pass over both."""
    _check_rows(x, weight)
    _check_rows(delta, weight)
    s = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = torch.empty_like(s)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](
            x,
            delta,
            weight,
            s,
            y,
            x.stride(0),
            delta.stride(0),
            s.stride(0),
            y.stride(0),
            x.shape[1],
            eps,
            **_norm_launch(x),
        )
    return s, y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] (last dim contiguous), weight [hidden] of x's dtype -> [T, hidden]."""
    _check_rows(x, weight)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, weight, y, x.stride(0), y.stride(0), x.shape[1], eps, **_norm_launch(x)
        )
    return y


@triton.jit
def _rotate(
    X,
    OUT,
    COS,
    SIN,
    t,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_c,
    n_heads,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < n_heads)[:, None]
    dt = OUT.dtype.element_ty
    cos = tl.load(COS + t * stride_c + offs_d).to(dt).to(tl.float32)[None, :]  # rounded as x's dtype
    sin = tl.load(SIN + t * stride_c + offs_d).to(dt).to(tl.float32)[None, :]
    x_ptr = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    # Each product and the sum are rounded, as the torch expression computes them in x's dtype.
    o1 = (x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)
    o2 = (x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)
    o_ptr = OUT + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr, o1.to(dt), mask=mask)
    tl.store(o_ptr + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    n_q_heads,
    n_k_heads,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    t = tl.program_id(0)
    _rotate(
        Q, QO, COS, SIN, t, stride_qt, stride_qh, stride_qot, stride_qoh, stride_c, n_q_heads, BLOCK_HQ, HALF
    )
    _rotate(
        K, KO, COS, SIN, t, stride_kt, stride_kh, stride_kot, stride_koh, stride_c, n_k_heads, BLOCK_HK, HALF
    )


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, D], k [T, Hkv, D] (any strides with a contiguous head dim), cos/sin [T, D/2]
    -> rotated (q, k), contiguous; one launch for both."""
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(0) != cos.stride(0):
        raise ValueError("rotary wants contiguous head dims and cos/sin rows of one stride")
    if half & (half - 1):
        raise ValueError(f"rotary needs a power-of-two head_dim, got {head_dim}")
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        pdl = pdl_enabled(q)
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            num_heads,
            k.shape[1],
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            HALF=half,
            USE_PDL=pdl,
            num_warps=4,
            **pdl_launch(pdl),
        )
    return qo, ko


@triton.jit
def _act_and_mul_kernel(
    X, Y, stride_x, stride_y, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + offs, mask=mask, other=0.0)
    a = activation(g, ACT).to(Y.dtype.element_ty).to(tl.float32)  # the activation's output is rounded first
    tl.store(Y + row * stride_y + offs, (a * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


FUSED_ACTS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


def act_and_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[T, 2F] = gate | up -> act(gate) * up [T, F]."""
    num_tokens, two_f = gate_up.shape
    f = two_f // 2
    y = torch.empty((num_tokens, f), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if num_tokens:
        pdl = pdl_enabled(gate_up)
        _act_and_mul_kernel[(num_tokens, triton.cdiv(f, block))](
            gate_up,
            y,
            gate_up.stride(0),
            y.stride(0),
            f,
            ACT=FUSED_ACTS[act],
            BLOCK=block,
            USE_PDL=pdl,
            num_warps=4,
            **pdl_launch(pdl),
        )
    return y


@triton.jit
def _gather_rows_kernel(TABLE, IDX, OUT, n_cols, stride_t, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    src = tl.load(IDX + row).to(tl.int64)
    tl.store(OUT + row * stride_o + offs, tl.load(TABLE + src * stride_t + offs, mask=mask), mask=mask)


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table [R, C] (rows contiguous), idx [T] of valid row ids -> table[idx] [T, C], one launch
    (torch's index_select launches a slower general kernel)."""
    out = torch.empty((idx.shape[0], table.shape[1]), dtype=table.dtype, device=table.device)
    if idx.shape[0]:
        block = min(4096, triton.next_power_of_2(table.shape[1]))
        grid = (idx.shape[0], triton.cdiv(table.shape[1], block))
        pdl = pdl_enabled(table)
        _gather_rows_kernel[grid](
            table, idx, out, table.shape[1], table.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl,
            **pdl_launch(pdl),
        )
    return out


# --- rewriting a model ---------------------------------------------------------------------


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and x.dtype == weight.dtype


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable(x, self.weight):
            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _fusable(x, self.weight) and _fusable(delta, self.weight) and x.shape == delta.shape:
            return add_rms_norm(x, delta, self.weight, self.eps)
        return super().add_forward(x, delta)


class FusedEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_cuda and ids.dim() == 1 and self.weight.stride(1) == 1:
            return gather_rows(self.weight, ids)  # ids are checked against the vocabulary at admission
        return super().forward(ids)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.is_cuda and positions.dim() == 1:
            return gather_rows(self.cos_sin_cache, positions).chunk(2, dim=-1)
        return super().forward(positions)


class FusedAttention(Attention):
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if not x.is_cuda:
            return super().project(x, cos, sin)
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.head_dim & (self.head_dim - 1):
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            q, k = rotary(q, k, cos, sin)
        return q, k, v.view(num_tokens, self.num_kv_heads, self.head_dim)


class FusedMLP(MLP):
    def activated(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.act.name in FUSED_ACTS:
            if self.gated:
                return act_and_mul(self.gate_up_proj(x), self.act.name)
            cfg = self.up_proj.skinny_config(x) if isinstance(self.up_proj, FusedLinear) else None
            if cfg is not None:  # the activation in the matmul's epilogue
                w = self.up_proj
                return skinny_linear(x, w.weight, w.bias, cfg, FUSED_ACTS[self.act.name])
        return super().activated(x)


class _SkinnyForward:
    """A linear that takes the Triton small-M matmul where the tuned table says it is faster."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.skinny_config(x)
        if cfg is not None:
            return skinny_linear(x, self.weight, self.bias, cfg)
        return super().forward(x)  # type: ignore[misc]

    def skinny_config(self, x: torch.Tensor) -> SkinnyConfig | None:
        """The Triton kernel's setting for this input, None where cuBLAS takes it."""
        w = self.weight
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(1) == 1):
            return None
        if w.dtype not in _SKINNY_DTYPES or x.dtype != w.dtype or not w.is_contiguous():
            return None
        return pick_config(x.shape[0], w.shape[0], w.shape[1])


_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


class FusedLinear(_SkinnyForward, nn.Linear):
    pass


class FusedMergedLinear(_SkinnyForward, MergedLinear):
    pass


_FUSED_CLASSES = {
    RMSNorm: FusedRMSNorm,
    Attention: FusedAttention,
    MLP: FusedMLP,
    nn.Linear: FusedLinear,
    nn.Embedding: FusedEmbedding,
    RotaryEmbedding: FusedRotaryEmbedding,
    MergedLinear: FusedMergedLinear,
}
_PLAIN_CLASSES = {v: k for k, v in _FUSED_CLASSES.items()}


def fuse_model(model: torch.nn.Module) -> int:
    """Switch RMSNorm, Attention and MLP modules to their fused subclasses (same parameters,
    same state; the subclasses add only a forward). Returns how many modules changed."""
    return swap_classes(model, _FUSED_CLASSES)


def unfuse_model(model: torch.nn.Module) -> int:
    return swap_classes(model, _PLAIN_CLASSES)
