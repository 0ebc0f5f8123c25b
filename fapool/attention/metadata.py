"""What an attention call needs to know about the batch, in tensors a kernel can read.

A batch is a flat run of `num_tokens` query tokens belonging to `num_seqs` sequences
(sequence s owns tokens query_start_loc[s] : query_start_loc[s+1]). Each sequence's KV is
reached through a block table. The KV a worker holds may be only a *shard* of a sequence
(the attention pool places blocks on several workers), so positions are explicit:

    query token j of sequence s sits at absolute position  q_pos = query_pos_start[s] + j
    KV entry i of the table sits at absolute position      k_pos = kv_start[s] + i,  i < kv_lens[s]
    the query sees the entry iff k_pos <= q_pos (causal)

With the whole sequence on one worker, kv_start = 0 and kv_lens = query_pos_start + query_len.
A shard that a query cannot see at all yields out = 0 and lse = -inf, which merges as a no-op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    query_pos_start: torch.Tensor  # [num_seqs] int32, absolute position of each seq's first query
    kv_lens: torch.Tensor  # [num_seqs] int32, KV entries reachable through the block table
    kv_start: torch.Tensor  # [num_seqs] int32, absolute position of KV entry 0
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot (block * block_size + offset) or -1
    max_query_len: int
    max_kv_len: int
    # Host copies of the per-sequence lengths, so reference code and launchers avoid syncs.
    query_lens_cpu: list[int]
    kv_lens_cpu: list[int]
    # query_pos_start - kv_start per sequence (row j sees entries i <= diag + j); None where the
    # builder did not keep it (the decode graphs).
    diag_cpu: list[int] | None = None
    # What a backend derives from the batch once and reuses in every layer (the torch
    # reference's gather indices and masks), keyed by backend.
    host_plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def without_kv(self, seqs: list[int]) -> AttentionMetadata:
        """The same batch with sequences `seqs` seeing no KV, so a backend gives their rows 0
        and lse -inf (sparse decode attends them on its own and overwrites those rows). No
        host sync: the device lengths are masked with a non-blocking copy."""
        kv_lens_cpu = list(self.kv_lens_cpu)
        for s in seqs:
            kv_lens_cpu[s] = 0
        drop = torch.zeros(self.num_seqs, dtype=torch.bool)
        drop[seqs] = True
        kv_lens = torch.where(drop.to(self.kv_lens.device, non_blocking=True), 0, self.kv_lens)
        return dataclasses.replace(self, kv_lens=kv_lens, kv_lens_cpu=kv_lens_cpu, host_plans={})

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        query_pos_start: list[int],
        kv_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        kv_start: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build from host lists (one H2D copy per field; pinned on CUDA)."""
        num_seqs = len(query_lens)
        if kv_start is None:
            kv_start = [0] * num_seqs
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        width = max((len(t) for t in block_tables), default=0) or 1
        table = torch.zeros((num_seqs, width), dtype=torch.int32)
        for s, row in enumerate(block_tables):
            if row:
                table[s, : len(row)] = torch.tensor(row, dtype=torch.int32)
        pin = torch.device(device).type == "cuda"

        def to_dev(values, dtype) -> torch.Tensor:
            t = torch.tensor(values, dtype=dtype)
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return cls(
            query_start_loc=to_dev(starts, torch.int32),
            query_pos_start=to_dev(query_pos_start, torch.int32),
            kv_lens=to_dev(kv_lens, torch.int32),
            kv_start=to_dev(kv_start, torch.int32),
            block_tables=(table.pin_memory() if pin else table).to(device, non_blocking=True),
            slot_mapping=to_dev(slot_mapping, torch.int64),
            max_query_len=max(query_lens, default=0),
            max_kv_len=max(kv_lens, default=0),
            query_lens_cpu=list(query_lens),
            kv_lens_cpu=list(kv_lens),
            diag_cpu=[p - k for p, k in zip(query_pos_start, kv_start)],
        )
