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

from dataclasses import dataclass

import torch

NUM_SINK_BLOCKS = 1
NUM_RECENT_BLOCKS = 1


# Past the longest calibrated length a head's blocks grow at least at this share of its share
# there: a flat last segment (no growth measured between the last two lengths) would freeze the
# head's block count however long the context gets. A floor well below the slopes calibration
# finds (benchmarks/RESULTS.md, sparse_profile).
MIN_GROWTH_PAST_LAST = 0.25


@dataclass(frozen=True, eq=False)
class BudgetRule:
    """Blocks each KV head attends over as a function of the sequence's block count nb.

    Up to the first knot a head takes a fixed fraction of the blocks, k = frac * nb; from knot
    j on, k = knot_k[j] + (nb - knot_nb[j]) * slope[j] (piecewise linear through the knots;
    past the last knot the last segment's slope, at least MIN_GROWTH_PAST_LAST x the head's
    share at that knot). With no knots it is the plain fraction rule. All float64;
    `budget_blocks` rounds up and clamps. The selection kernel evaluates the same expression
    in the same order (fapool.sparse.triton_select), so the two agree exactly.

    Why knots: the share of blocks a head needs falls as the context grows (the mass sits on
    a few sinks, the recent tokens and a handful of far blocks, not on a fixed share of the
    whole), so a fraction calibrated at 2K over-spends at 32K. A profile calibrated at several
    lengths gives the knots (SparseProfile.rule)."""

    frac: torch.Tensor  # [H] fraction of blocks below the first knot
    knot_nb: torch.Tensor  # [J] block counts of the knots, ascending (J may be 0)
    knot_k: torch.Tensor  # [H, J] blocks at each knot (non-decreasing in j)
    slope: torch.Tensor  # [H, J] blocks per extra block after knot j (>= 0)

    @classmethod
    def fractions(cls, frac) -> BudgetRule:
        f = torch.as_tensor(frac, dtype=torch.float64).reshape(-1).contiguous()
        empty = torch.zeros(f.numel(), 0, dtype=torch.float64, device=f.device)
        return cls(f, torch.zeros(0, dtype=torch.float64, device=f.device), empty, empty.clone())

    @classmethod
    def from_knots(cls, fracs_at: list[list[float]], knot_nb: list[float]) -> BudgetRule:
        """fracs_at [J][H]: each head's budget fraction at knot j (block count knot_nb[j])."""
        x = torch.tensor(knot_nb, dtype=torch.float64)
        if x.numel() == 0 or bool((x[1:] <= x[:-1]).any()) or bool((x <= 0).any()):
            raise ValueError(f"knot block counts must be positive, ascending and non-empty, got {knot_nb}")
        f = torch.tensor(fracs_at, dtype=torch.float64)  # [J, H]
        if f.dim() != 2 or f.shape[0] != x.numel():
            raise ValueError(f"need one row of head fractions per knot ({x.numel()}), got shape {tuple(f.shape)}")
        if not bool(((f > 0) & (f <= 1)).all()):
            raise ValueError("budget fractions must lie in (0, 1]")
        if x.numel() == 1:
            return cls.fractions(f[0])
        # Blocks at each knot, made non-decreasing: a longer context never gets fewer blocks.
        y = torch.cummax(f * x[:, None], dim=0).values.T.contiguous()  # [H, J]
        seg = (y[:, 1:] - y[:, :-1]) / (x[1:] - x[:-1])  # [H, J-1]
        past = torch.maximum(seg[:, -1], MIN_GROWTH_PAST_LAST * y[:, -1] / x[-1])
        slope = torch.cat([seg, past[:, None]], dim=1)
        return cls(f[0].contiguous(), x, y, slope.contiguous())

    @property
    def num_heads(self) -> int:
        return self.frac.numel()

    @property
    def device(self) -> torch.device:
        return self.frac.device

    def raw(self, nb: torch.Tensor) -> torch.Tensor:
        """Unrounded blocks: nb [...] (any integer/float, on the rule's device) -> [..., H]
        float64. Tensor ops only: no host sync on a GPU."""
        n = nb.double().unsqueeze(-1)
        val = self.frac * n
        for j in range(self.knot_nb.shape[0]):
            x = self.knot_nb[j]
            val = torch.where(n > x, self.knot_k[:, j] + (n - x) * self.slope[:, j], val)
        return val

    def to(self, device) -> BudgetRule:
        return BudgetRule(*(t.to(device) for t in (self.frac, self.knot_nb, self.knot_k, self.slope)))


# Blocks a head reads at the least, whatever its budget (the sink and the recent window need them).
DEFAULT_MIN_BLOCKS = 4


def _as_rule(budget) -> BudgetRule:
    return budget if isinstance(budget, BudgetRule) else BudgetRule.fractions(budget)


def budget_blocks(frac: torch.Tensor | BudgetRule, num_blocks: int, min_blocks: int) -> torch.Tensor:
    """Budget per head (fractions [H] or a BudgetRule) -> blocks per head for a sequence of
    `num_blocks` blocks: ceil(rule), at least min_blocks, at most num_blocks. (int64 [H])."""
    rule = _as_rule(frac)
    raw = rule.raw(torch.tensor(num_blocks, device=rule.device))
    k = torch.ceil(raw - 1e-6).long()  # 1e-6: float32 fractions
    return k.clamp(min=min(min_blocks, num_blocks), max=num_blocks)


def max_budget_blocks(budget: torch.Tensor | BudgetRule, num_blocks: int, min_blocks: int) -> int:
    """The largest head's blocks at `num_blocks` (rules are monotone in nb: the cap of any
    narrower row too)."""
    return int(budget_blocks(budget, num_blocks, min_blocks).max())


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
    frac: torch.Tensor | BudgetRule, num_kv: torch.Tensor, block_size: int, min_blocks: int
) -> torch.Tensor:
    """budget_blocks for every sequence at once, on the device, without a host sync:
    frac [H] fractions (or a BudgetRule), num_kv [B] visible KV entries -> [B, H] int64
    blocks (0 for empty rows)."""
    nb = (num_kv.long() + block_size - 1) // block_size  # [B]
    rule = _as_rule(frac)
    if rule.device != nb.device:
        rule = rule.to(nb.device)  # a copy: callers in CUDA graphs keep the rule on the device
    k = torch.ceil(rule.raw(nb) - 1e-6).long()
    nb = nb.view(-1, 1)
    return torch.minimum(torch.maximum(k, nb.clamp(max=min_blocks)), nb)


def select_block_indices(
    score: torch.Tensor, num_blocks: torch.Tensor, budgets: torch.Tensor, width: int
) -> torch.Tensor:
    """score [B, H, N] block scores (N >= every row's block count), num_blocks [B] visible
    blocks, budgets [B, H] -> [B, H, width]: the indices of the first min(k, nb, width) blocks
    of block_order, ascending, with N in the unused slots."""
    n = score.shape[-1]
    order = block_order(score, num_blocks)  # [B, H, N]
    k = torch.minimum(budgets.long(), num_blocks.long().view(-1, 1)).clamp(max=width)
    taken = torch.arange(n, device=score.device) < k[..., None]
    blocks = torch.where(taken, order, n).sort(dim=-1).values[..., :width]
    if blocks.shape[-1] < width:
        blocks = torch.nn.functional.pad(blocks, (0, width - blocks.shape[-1]), value=n)
    return blocks


def pages_in_range(
    blocks: torch.Tensor,
    num_kv: torch.Tensor,
    table: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_size: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen blocks one holder stores, as the decode kernels read them.

    blocks [B, H, K] chosen block indices of each row (select_block_indices), num_kv [B]
    visible entries; the holder stores row b's blocks lo[b] <= i < hi[b] at pages
    table[b, i - lo[b]] -> (pages [B, H, width] int32: those blocks' pages ascending, zero-padded;
    lens [B, H] int32: the visible entries they hold). Only the most recent block can be
    partial and, when held, it is the last entry, so a kernel needs no mask beyond lens.
    `width` must cover every row's count of chosen blocks in range."""
    lo, hi = lo.long().view(-1, 1, 1), hi.long().view(-1, 1, 1)
    inside = (blocks >= lo) & (blocks < hi)
    big = torch.iinfo(torch.long).max
    rel = torch.where(inside, blocks - lo, big).sort(dim=-1).values[..., :width]
    if rel.shape[-1] < width:
        rel = torch.nn.functional.pad(rel, (0, width - rel.shape[-1]), value=big)
    used = rel < big
    idx = rel.clamp(max=max(table.shape[1] - 1, 0)).flatten(1)
    pages = table.long().gather(1, idx).view_as(rel) if table.shape[1] else torch.zeros_like(rel)
    pages = torch.where(used, pages, 0).to(torch.int32)
    nb = (num_kv.long() + block_size - 1) // block_size
    has_recent = (inside & (blocks == (nb - 1).view(-1, 1, 1))).any(-1)
    tail = (num_kv.long() - (nb - 1) * block_size).view(-1, 1)
    count = used.sum(-1)
    lens = torch.where(has_recent, (count - 1) * block_size + tail, count * block_size)
    return pages, lens.to(torch.int32)


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
    zero-padded; lens [B, H] int32: the visible entries they hold): pages_in_range of one
    holder of every block."""
    nb = (num_kv.long() + block_size - 1) // block_size  # [B]
    blocks = select_block_indices(score, nb, budgets, max_pages)
    n = score.shape[-1]
    return pages_in_range(blocks, num_kv, block_tables[:, :n], torch.zeros_like(nb), nb, block_size, max_pages)


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
