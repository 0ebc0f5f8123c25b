"""The attention interface every backend implements, and the exact merge of partial results.

Paged KV layout, per layer and worker (vLLM's flash layout):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Flat slot = block_id * block_size + offset.

`forward` returns (out, lse): out [num_tokens, num_heads, head_dim] in the query dtype and
lse [num_tokens, num_heads] float32, the natural-log sum of exp(scaled scores) over the KV
the query saw. Two results over disjoint KV shards merge exactly with `merge_partials`.

An FP8 cache (fapool.attention.kv_quant) stores K / scales.k and V / scales.v: both calls take
the layer's `scales`, which matter only when the cache is e4m3.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fapool.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class KVScales:
    """A layer's 8-bit cache scales (kv_quant). FP8: the cache holds K / k and V / v. INT8: each
    token's row of a KV head is divided by its own scale, kept in k_pages / v_pages
    [blocks, kv heads, block_size] float32 beside the cache. Either: K's channel means `k_shift`
    [kv heads, head_dim] float32 are subtracted first (softmax does not see the shift; lse does)."""

    k: float = 1.0
    v: float = 1.0
    k_pages: torch.Tensor | None = None
    v_pages: torch.Tensor | None = None
    k_shift: torch.Tensor | None = None


class AttentionBackend(ABC):
    name: str = "abstract"
    # True when write_kv and forward never read device values on the host, so a decode step can
    # be captured in a CUDA graph (fapool.worker.cuda_graphs).
    graph_safe: bool = False

    @abstractmethod
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = not stored on this worker
        scales: KVScales | None = None,
    ) -> None:
        """Scatter the step's new K/V into their slots."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        scales: KVScales | None = None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of the queries over the paged KV -> (out, lse). `new_kv`: this step's
        (key, value) rows, in query order, as write_kv just stored them; a backend may read them
        there instead of gathering them back from the pages."""


def empty_partial(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention over no KV for query [T, H, D]: 0 in query's dtype, lse -inf."""
    lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    return torch.zeros_like(query), lse


def merge_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention results over disjoint KV shards exactly (log-sum-exp weights).

    outs[i]: [..., head_dim], lses[i]: [...] float32. Shards a query did not see carry
    lse = -inf and contribute nothing; a query that saw no KV at all gets out 0, lse -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge_partials needs one lse per output and at least one pair")
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack([x.float() for x in lses])  # [n, ...]
    lse_max = lse.max(dim=0).values
    safe_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    weights = torch.exp(lse - safe_max)  # exp(-inf) = 0 for unseen shards
    total = weights.sum(dim=0)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for w, o in zip(weights, outs):
        out += w.unsqueeze(-1) * o.float()
    nonzero = total > 0
    out = torch.where(nonzero.unsqueeze(-1), out / total.clamp_min(1e-38).unsqueeze(-1), out)
    merged_lse = torch.where(nonzero, safe_max + torch.log(total.clamp_min(1e-38)), lse_max)
    return out.to(outs[0].dtype), merged_lse


def merge_tree(
    outs: list[torch.Tensor], lses: list[torch.Tensor], fan_in: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge many partials pairwise in a tree (same result as one flat merge up to rounding);
    the shape the attention pool uses when results arrive from many workers."""
    pairs = list(zip(outs, lses))
    while len(pairs) > 1:
        nxt = []
        for i in range(0, len(pairs), fan_in):
            group = pairs[i : i + fan_in]
            o, l = merge_partials([g[0] for g in group], [g[1] for g in group])
            nxt.append((o, l))
        pairs = nxt
    return pairs[0]
