"""Block summaries and top-k block selection for sparse decode (Quest-style bounds).

Summary: per KV block and KV head, the element-wise min and max of its keys (kmin, kmax:
[num_blocks, num_kv_heads, head_dim]). For a query q,

    bound(q, block) = sum_d max(q_d * kmin_d, q_d * kmax_d)  >=  q . k   for every key k in it,

so a block whose bound is low cannot hold a high score. We use it rather than the block mean
because the mean averages one outlier key (the attention sinks and "needle" tokens that carry
most of the mass) away, while the bound keeps it; it costs 2 x D numbers per block and head
(1/8 of the block's keys at block_size 16) and one pass over them per step.

GQA: the query heads sharing a KV head read the same blocks (a kernel loads each page once per
KV head), so the score of a block for a KV head is the max of its query heads' bounds.

Always kept: the first block (attention sinks) and the last visible block (the most recent
tokens, including the partial one). A budget of k blocks is those plus the k - 2 best others.
"""

from __future__ import annotations

import math

import torch

NUM_SINK_BLOCKS = 1
NUM_RECENT_BLOCKS = 1


def budget_blocks(frac: torch.Tensor, num_blocks: int, min_blocks: int) -> torch.Tensor:
    """Budget fraction per head -> blocks per head for a sequence of `num_blocks` blocks:
    ceil(frac * num_blocks), at least min_blocks, at most num_blocks. (int64, same shape)."""
    k = torch.ceil(frac.double() * num_blocks - 1e-6).long()  # 1e-6: float32 fractions
    return k.clamp(min=min(min_blocks, num_blocks), max=num_blocks)


def budget_blocks_scalar(frac: float, num_blocks: int, min_blocks: int) -> int:
    return max(min(min_blocks, num_blocks), min(num_blocks, math.ceil(frac * num_blocks - 1e-6)))


def block_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [..., G, D] (the G query heads of one KV head), kmin/kmax [..., N, D] -> the KV-head
    score of each block [..., N]: max over the G heads of the upper bound of q . k."""
    q = q.float().unsqueeze(-2)  # [..., G, 1, D]
    lo, hi = kmin.float().unsqueeze(-3), kmax.float().unsqueeze(-3)  # [..., 1, N, D]
    bound = torch.maximum(q * lo, q * hi).sum(-1)  # [..., G, N]
    return bound.max(dim=-2).values


def block_order(score: torch.Tensor, num_visible: torch.Tensor) -> torch.Tensor:
    """score [B, H, N] (N = padded block count), num_visible [B] blocks each row sees ->
    block indices [B, H, N] in selection order: sink, recent, then by descending score;
    invisible blocks (index >= num_visible) last. A budget of k takes the first k."""
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    vis = num_visible.view(-1, 1, 1)
    key = score.float().clone()
    fixed = (idx < NUM_SINK_BLOCKS) | ((idx >= vis - NUM_RECENT_BLOCKS) & (idx < vis))
    key = torch.where(fixed, torch.full_like(key, float("inf")), key)
    key = torch.where(idx >= vis, torch.full_like(key, float("-inf")), key)
    # Stable sort, so ties keep position order (reproducible selections).
    return torch.sort(key, dim=-1, descending=True, stable=True).indices
