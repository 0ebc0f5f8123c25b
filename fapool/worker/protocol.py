"""The wire protocol between the driver (rank 0) and the other ranks: one tag enum and every
message type. Objects (init, step plans, reports) travel pickled through comm.send_object;
tensors (q/k/v rows, partials, hidden states, logits, weights) travel as tensors, tagged so
that messages of different layers and micro-batches never cross under gloo.

Roles: a *dense* rank holds a tensor/pipeline-parallel shard of the model and its heads' local
KV; an *attention* rank holds pool KV blocks and answers (out, lse) for its share of a layer.
Disaggregated (AFD), an *AFD attention* rank runs everything but the FFN for its share of the
requests, and an *FFN* rank runs every layer's FFN (a tensor-parallel slice) for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch

from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig

SHUTDOWN = "shutdown"  # sent on Tag.STEP instead of a step plan


class Tag(IntEnum):
    STEP = 0  # a step plan (an object takes two tags: size, then bytes)
    REPORT = 2  # a rank's RankReport at the end of a step
    INIT = 4  # the rank's role: AttentionInit or DenseInit
    WEIGHTS = 6  # weight specs, then each tensor on WEIGHTS + 2
    HIDDEN = 100  # + micro-batch: hidden states from one pipeline stage to the next
    LOGITS = 500  # + micro-batch: the last stage's logits of due rows, to the driver
    EXCHANGE = 1000  # + exchange_offset(): q/k/v rows out, (out, lse) partials back on + 1


def exchange_tag(layer: int, micro_batch: int, num_micro_batches: int) -> int:
    """The tag of one (layer, micro-batch) exchange; its reply uses the tag + 1."""
    return Tag.EXCHANGE + 2 * (layer * num_micro_batches + micro_batch)


def pack_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of any dtypes as one flat uint8 message: one send, not one per dtype."""
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


def unpack_bytes(buf: torch.Tensor, specs: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """The flat tensors (dtype, numel) a pack_bytes message holds, in order (views of buf)."""
    sizes = [n * dtype.itemsize for dtype, n in specs]
    return [b.view(dtype) for b, (dtype, _) in zip(buf.split(sizes), specs)]


# Start ---------------------------------------------------------------------------------------
@dataclass
class AttentionInit:
    config: EngineConfig
    worker_id: int  # 1.. (0 is the dense side in block tables)
    num_blocks: int
    kv_heads: list[int]  # global KV head ids this rank stores (all of them unless head mode)


@dataclass
class DenseInit:
    config: EngineConfig
    num_blocks: int
    # With an attention pool next to pipeline stages: every worker's KV heads (each stage
    # exchanges with the pool for its own layers).
    pool_kv_heads: dict[int, list[int]] | None = None
    # With an elastic pool on Ray: the driver's rendezvous store (host, port), where a stage
    # leader learns of joining workers (ray_pool.StagePairs).
    pool_store: tuple[str, int] | None = None


@dataclass
class AFDInit:
    config: EngineConfig
    role: str  # "attention" | "ffn"
    num_blocks: int = 0  # an attention rank's KV blocks (its partition of the block ids)


# A step, for an attention rank -----------------------------------------------------------
@dataclass
class Entry:
    """Attention of some of a sequence's queries over one contiguous range of its KV."""

    num_queries: int
    query_pos_start: int
    kv_start: int
    kv_len: int
    block_ids: list[int]


@dataclass
class WorkerBatch:
    """One attention rank's share of one micro-batch, identical for every layer."""

    entries: list[Entry] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)  # slot of each new K/V row, in row order
    # Sparse decode: these entries (one query each) attend over the pages the driver chose
    # (sent with the query rows, at most `sparse_pages` per KV head), not their whole range.
    sparse_entries: list[int] = field(default_factory=list)
    sparse_pages: int = 0

    @property
    def num_q_rows(self) -> int:
        return sum(e.num_queries for e in self.entries)

    def metadata(self, device: torch.device | str) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """-> (the dense attention's metadata, where sparse entries see no KV; the new K/V
        rows' slots; the query row of each sparse entry)."""
        sparse = set(self.sparse_entries)
        meta = AttentionMetadata.build(
            query_lens=[e.num_queries for e in self.entries],
            query_pos_start=[e.query_pos_start for e in self.entries],
            kv_lens=[0 if i in sparse else e.kv_len for i, e in enumerate(self.entries)],
            block_tables=[e.block_ids for e in self.entries],
            slot_mapping=[-1] * self.num_q_rows,  # K/V rows are written separately
            kv_start=[e.kv_start for e in self.entries],
            device=device,
        )
        first = [0]
        for e in self.entries:
            first.append(first[-1] + e.num_queries)
        rows = torch.tensor([first[i] for i in self.sparse_entries], dtype=torch.int64, device=device)
        return meta, torch.tensor(self.kv_slots, dtype=torch.int64, device=device), rows


@dataclass
class Route:
    """A dense rank's bookkeeping for one attention rank in one micro-batch: which rows of
    q/k/v it gets, and where its answers go back."""

    worker: int
    batch: WorkerBatch
    q_rows: list[int] = field(default_factory=list)  # token index of each query row
    kv_rows: list[int] = field(default_factory=list)  # token index of each new K/V row
    rounds: list[list[int]] = field(default_factory=list)  # row groups whose tokens are unique


@dataclass
class AttentionStep:
    step: int
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    batches: dict[int, WorkerBatch] = field(default_factory=dict)  # micro-batch -> its share
    num_micro_batches: int = 1
    # (layer, micro-batch, dense rank) in the order the dense ranks send: the driver's
    # micro-batches advance layer by layer; with pipeline stages, stage by stage.
    order: list[tuple[int, int, int]] = field(default_factory=list)
    hang_s: float = 0.0  # fault injection for tests: stall this long before the step


# A step, for a dense rank ----------------------------------------------------------------
@dataclass
class MicroBatch:
    input_ids: list[int]
    positions: list[int]
    meta_args: dict  # AttentionMetadata.build keyword arguments (host lists)
    logit_rows: list[int]  # rows whose next token is due, in order
    # Some rows attend KV on the attention pool: every layer this micro-batch's q/k/v go to
    # the driver and the pool's partials for this rank's heads come back (tensor parallel) ...
    remote: bool = False
    # ... or, pipeline stages, each stage exchanges with the attention ranks itself.
    routes: dict[int, Route] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


@dataclass
class DenseStep:
    step: int
    micro_batches: list[MicroBatch]
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    failed_workers: list[int] = field(default_factory=list)  # attention ranks the driver gave up on
    hang_s: float = 0.0  # fault injection for tests: stall this long before the step


@dataclass
class AFDStep:
    """One step of a disaggregated engine. An attention rank gets its own micro-batches (an
    empty one where it has no request in it) with block ids local to its partition; an FFN
    rank gets the token counts it will receive, [micro-batch][attention rank]."""

    step: int
    micro_batches: list[MicroBatch] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    tokens: list[list[int]] = field(default_factory=list)
    hang_s: float = 0.0  # fault injection for tests: stall this long before the step


# Reports -------------------------------------------------------------------------------------
@dataclass
class RankReport:
    """One rank's step: compute (a dense rank's layers; an attention rank's K/V writes and
    attention), communication (posting and completing sends, all-reduces) and idle time
    (waiting for input: the plan, queries, the previous stage)."""

    rank: int
    compute_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    num_tokens: int = 0
    role: str = "dense"  # "dense"; disaggregated: "attention" or "FFN"
    q_rows: int = 0  # attention ranks: query rows answered
    sparse_rows: int = 0  # attention ranks: of those, rows attended over chosen pages only
    failed_workers: dict[int, str] = field(default_factory=dict)  # attention ranks this one lost


@dataclass
class StepReport:
    """The driver's record of one step across every rank: what the breakdown (fapool bench,
    the CLI's --breakdown) and the simulator's calibration read."""

    step: int
    num_tokens: int
    num_micro_batches: int
    total_s: float = 0.0
    dense_s: float = 0.0  # the driver's embeddings, projections, FFN, LM head, merges
    local_attention_s: float = 0.0  # the driver's attention over its local KV
    wait_s: float = 0.0  # the driver blocked on attention ranks (or, TP/PP, on its peers)
    tp_comm_s: float = 0.0  # the driver's all-reduces and exchanges with the other dense ranks
    plan_s: float = 0.0  # the driver's host time building and sending the step's plans
    workers: dict[int, RankReport] = field(default_factory=dict)  # attention ranks, by worker id
    ranks: dict[int, RankReport] = field(default_factory=dict)  # dense ranks, by rank (0 included)
    pool_size: int = 0  # attention workers serving at least one request
    kv_tokens_per_worker: dict[int, int] = field(default_factory=dict)

    @property
    def overlap(self) -> float | None:
        """Share of the pool's attention time hidden behind the driver's own work:
        1 - (time the driver waited) / (busiest attention rank's compute time)."""
        busy = max((w.compute_s for w in self.workers.values()), default=0.0)
        if busy <= 0:
            return None
        return max(0.0, min(1.0, 1.0 - self.wait_s / busy))

    @property
    def comm_share(self) -> float:
        """The driver's time blocked on communication, as a share of the step."""
        return (self.wait_s + self.tp_comm_s) / self.total_s if self.total_s > 0 else 0.0
