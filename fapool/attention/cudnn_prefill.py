"""Long prefill chunks through cuDNN's fused attention (PyTorch's binding), behind the backends'
(out, lse) interface.

cuDNN's SDPA is the fastest causal prefill that torch ships for Hopper. Its causal mask is
aligned top-left, so a chunk over a cached prefix runs as two calls, merged exactly by their
LSEs: the prefix with no mask, then the chunk's own square with the causal mask. The chunk's own
K/V are read where the projection left them; a prefix is gathered from the paged cache into one
contiguous run. One fresh sequence that is the whole batch gets cuDNN's output as is.
"""

from __future__ import annotations

import functools

import torch

from fapool.attention.backend import merge_partials
from fapool.attention.metadata import AttentionMetadata

_cudnn_sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention


def usable(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """cuDNN can run this layer's prefill: a CUDA 16-bit query over a cache of the same dtype
    (an FP8 cache stays on the Triton kernel), cuDNN 9 or later, head_dim a multiple of 8 up to 128."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and k_cache.dtype == query.dtype
        and head_dim % 8 == 0
        and head_dim <= 128
        and torch.backends.cudnn.is_available()
        and (torch.backends.cudnn.version() or 0) >= 90000
    )


def plan(meta: AttentionMetadata, min_query_len: int, min_pairs: int = 0) -> list[int]:
    """The sequences cuDNN takes: query chunks of at least `min_query_len` tokens and
    `min_pairs` causal query-key pairs whose KV here ends with the chunk itself (a whole
    sequence, or a shard holding the chunk and part of its prefix). A shard that ends before the
    chunk does stays on the Triton kernel."""
    if meta.diag_cpu is None:
        return []
    return [
        s
        for s, (q_len, kv_len, diag) in enumerate(zip(meta.query_lens_cpu, meta.kv_lens_cpu, meta.diag_cpu))
        if q_len >= min_query_len
        and diag >= 0
        and diag + q_len == kv_len
        and q_len * (diag + (q_len + 1) / 2) >= min_pairs
    ]


def attend(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Q, H, D], k / v [L, Hkv, D] -> out [Q, H, D], lse [Q, H] float32 (natural log)."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _native_gqa(q.device.index or 0, q.dtype):
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # [1, heads, len, D] views of the token-major tensors (cuDNN takes the strides as they are)
    out, lse = _cudnn_sdpa(
        q.unsqueeze(0).transpose(1, 2),
        k.unsqueeze(0).transpose(1, 2),
        v.unsqueeze(0).transpose(1, 2),
        None,
        True,
        0.0,
        causal,
        False,
        scale=scale,
    )[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[0]).transpose(0, 1)


@functools.cache
def _native_gqa(device: int, dtype: torch.dtype) -> bool:
    """Whether this cuDNN takes fewer KV heads than query heads, answered once per device by a
    tiny call checked against torch's math attention."""
    g = torch.Generator(device=f"cuda:{device}").manual_seed(0)
    q = torch.randn(1, 4, 64, 64, device=f"cuda:{device}", dtype=dtype, generator=g)
    kv = torch.randn(1, 2, 64, 64, device=f"cuda:{device}", dtype=dtype, generator=g)
    try:
        out = _cudnn_sdpa(q, kv, kv, None, True, 0.0, True, False)[0]
    except RuntimeError:
        return False
    full = kv.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), full.float(), full.float(), is_causal=True
    )
    return out.shape == q.shape and torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2)


def _gather(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` entries of a sequence's paged KV as one [length, Hkv, D] run."""
    page = cache.shape[1]
    pages = cache.index_select(0, table_row[: -(-length // page)])
    return pages.flatten(0, 1)[:length]


def prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    seqs: list[int],
    out: torch.Tensor,
    lse: torch.Tensor,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Attention of `seqs` (from `plan`) into their rows of out / lse. With `new_kv` (the step's
    K/V rows in query order) a chunk's own keys are read there; only a prefix is gathered."""
    starts = [0]
    for n in meta.query_lens_cpu:
        starts.append(starts[-1] + n)
    for s in seqs:
        q0, q_len, kv_len = starts[s], meta.query_lens_cpu[s], meta.kv_lens_cpu[s]
        prefix = kv_len - q_len
        q = query[q0 : q0 + q_len]
        rows = slice(q0, q0 + q_len)
        gathered = prefix if new_kv is not None else kv_len
        k = _gather(k_cache, meta.block_tables[s], gathered) if gathered else None
        v = _gather(v_cache, meta.block_tables[s], gathered) if gathered else None
        if new_kv is not None:
            o, l = attend(q, new_kv[0][rows], new_kv[1][rows], scale, causal=True)
        else:
            o, l = attend(q, k[prefix:], v[prefix:], scale, causal=True)
        if not prefix:
            out[rows] = o
            lse[rows] = l
            continue
        o_pre, l_pre = attend(q, k[:prefix], v[:prefix], scale, causal=False)
        if query.is_cuda:
            from fapool.attention.triton_merge import merge_two_into

            merge_two_into(o_pre, l_pre, o, l, out[rows], lse[rows])
        else:  # the glue's CPU test, with cuDNN's op replaced by the same math
            out[rows], lse[rows] = merge_partials([o_pre, o], [l_pre, l])
