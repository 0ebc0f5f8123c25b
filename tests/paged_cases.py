"""Shared builders for attention tests over paged KV."""

from __future__ import annotations

import math

from fapool.attention.metadata import AttentionMetadata


def shard_metadata(
    specs: list[tuple[int, int]],
    tables: list[list[int]],
    slot_mapping: list[int],
    block_size: int,
    num_shards: int,
    shard: int,
    device="cpu",
) -> AttentionMetadata:
    """Metadata for one of `num_shards` contiguous block ranges of each sequence, as the
    attention pool cuts them: its blocks, kv_start at the range's first position, kv_len
    clipped to the sequence. specs: (context_len, query_len) per sequence."""
    sub_tables, kv_lens, kv_start = [], [], []
    for s, (ctx, ql) in enumerate(specs):
        nb = math.ceil((ctx + ql) / block_size)
        lo, hi = nb * shard // num_shards, nb * (shard + 1) // num_shards
        sub_tables.append(tables[s][lo:hi])
        kv_start.append(lo * block_size)
        kv_lens.append(max(0, min(ctx + ql, hi * block_size) - lo * block_size))
    return AttentionMetadata.build(
        query_lens=[ql for _, ql in specs],
        query_pos_start=[c for c, _ in specs],
        kv_lens=kv_lens,
        block_tables=sub_tables,
        slot_mapping=slot_mapping,
        kv_start=kv_start,
        device=device,
    )
