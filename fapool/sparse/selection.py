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
    block indices [B, H, N] in selection order. A budget of k takes the first k.

    Order (the tie rule every selector follows, fapool.sparse.triton_select included):
    the sink block 0, then the most recent block num_visible - 1, then the other visible
    blocks by descending score with equal scores (and -0.0 == +0.0) in ascending block index,
    then the invisible blocks. So k = 1 keeps only the sink and k = 2 sink + recent, whatever
    the scores (even +inf). Scores must not be NaN."""
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    vis = num_visible.view(-1, 1, 1)
    group = torch.full(score.shape, 2, dtype=torch.int8, device=score.device)
    group = torch.where((idx >= vis - NUM_RECENT_BLOCKS) & (idx < vis), 1, group)
    group = torch.where(idx < NUM_SINK_BLOCKS, 0, group)
    group = torch.where(idx >= vis, 3, group)
    # Two stable sorts, minor key first: lexicographic (group, -score, index).
    order = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, torch.sort(group.gather(-1, order), dim=-1, stable=True).indices)


def budget_blocks_batched(
    frac: torch.Tensor, num_kv: torch.Tensor, block_size: int, min_blocks: int
) -> torch.Tensor:
    """budget_blocks for every sequence at once, on the device, without a host sync:
    frac [H] fractions, num_kv [B] visible KV entries -> [B, H] int64 blocks (0 for empty rows)."""
    nb = ((num_kv.long() + block_size - 1) // block_size).view(-1, 1)
    k = torch.ceil(frac.double().view(1, -1) * nb.double() - 1e-6).long()
    return torch.minimum(torch.maximum(k, nb.clamp(max=min_blocks)), nb)


def compact_selection(
    score: torch.Tensor,
    num_kv: torch.Tensor,
    budgets: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    max_pages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for the selection kernels' output layout.

    score [B, H, N] block scores (N >= every row's block count), num_kv [B] visible entries,
    budgets [B, H] blocks, block_tables [B, >= N] -> (pages [B, H, max_pages] int32: the page
    ids of the first min(k, nb, max_pages) blocks of block_order, in ascending block order,
    zero-padded; lens [B, H] int32: the visible KV entries they hold). Only the most recent
    block can be partial and, if chosen, it is the last entry, so the kernel reading the pages
    needs no mask beyond lens."""
    num_seqs, num_heads, n = score.shape
    nb = (num_kv.long() + block_size - 1) // block_size  # [B]
    order = block_order(score, nb)  # [B, H, N]
    k = torch.minimum(budgets.long(), nb.view(-1, 1)).clamp(max=max_pages)
    taken = torch.arange(n, device=score.device) < k[..., None]
    blocks = torch.where(taken, order, n).sort(dim=-1).values[..., :max_pages]  # n = unused slot
    if blocks.shape[-1] < max_pages:
        blocks = torch.nn.functional.pad(blocks, (0, max_pages - blocks.shape[-1]), value=n)
    used = blocks < n
    table = block_tables[:, :n].long()
    pages = table.gather(1, blocks.clamp(max=n - 1).flatten(1)).view_as(blocks)
    pages = torch.where(used, pages, 0).to(torch.int32)
    has_recent = (used & (blocks == (nb - 1).view(-1, 1, 1))).any(-1)
    tail = (num_kv.long() - (nb - 1) * block_size).view(-1, 1)
    count = used.sum(-1)
    lens = torch.where(has_recent, (count - 1) * block_size + tail, count * block_size)
    return pages, lens.to(torch.int32)


def select_blocks_torch(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    block_tables: torch.Tensor,
    n_kv: torch.Tensor,
    budgets: torch.Tensor,
    block_size: int,
    max_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of fapool.sparse.triton_select.select_blocks_triton (block budgets):
    q [B, Hq, D], kmin/kmax [num_blocks, Hkv, D], block_tables [B, W], n_kv [B], budgets
    [B, Hkv] -> (pages [B, Hkv, max_pages or W] int32, lens [B, Hkv] int32). Scores in float32."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kmin.shape[1]
    table = block_tables.long()  # [B, W]
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    lo = kmin[table].permute(0, 2, 1, 3)  # [B, Hkv, W, D]
    hi = kmax[table].permute(0, 2, 1, 3)
    score = block_bounds(qg, lo, hi)  # [B, Hkv, W]
    width = block_tables.shape[1]
    max_pages = width if max_pages is None else max_pages
    return compact_selection(score, n_kv, budgets, block_tables, block_size, max_pages)
