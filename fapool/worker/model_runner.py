"""Runs the model on one worker: owns the paged KV cache tensors, turns a SchedulerOutput into
a flat token batch with attention metadata, and returns the logits of the requests whose
next token is due. It makes no scheduling decisions.
"""

from __future__ import annotations

import logging

import torch

from fapool.attention.backend import AttentionBackend
from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CPU_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> None:
        self.config = config
        self.model = model
        self.backend = backend
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.block_size = config.cache.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # KV cache -----------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.config.model
        return m.kv_bytes_per_token(self.dtype.itemsize) * self.block_size

    def determine_num_blocks(self) -> int:
        """Blocks that fit the KV budget: an explicit count, kv_cache_memory bytes, or (GPU)
        gpu_memory_utilization of the card minus what weights and a profiled forward use."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget()
        else:
            budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // self.bytes_per_block()
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) holds no block of {self.bytes_per_block()} bytes; "
                "raise kv_cache_memory or gpu_memory_utilization"
            )
        return int(num_blocks)

    def _profile_gpu_budget(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.scheduler.max_num_batched_tokens, self.config.max_model_len)
        # A forward at the full token budget with a throwaway one-block-per-16-tokens cache
        # measures peak activation memory.
        nb = -(-n // self.block_size) + 1
        self.allocate_kv_cache(nb)
        meta = AttentionMetadata.build(
            [n], [0], [n], [list(range(nb))], list(range(n)), device=self.device
        )
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, pos, self.kv_caches, meta)
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        used_elsewhere = total - torch.cuda.mem_get_info(self.device)[0] - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.cache.gpu_memory_utilization - peak - max(0, used_elsewhere))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        shape = (num_blocks, self.block_size, m.num_key_value_heads, m.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(m.num_hidden_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    # Forward ------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for s in out.scheduled:
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            input_ids += s.request.all_token_ids[start:end]
            positions += range(start, end)
            slots += [s.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
        meta = AttentionMetadata.build(
            query_lens=[s.num_new_tokens for s in out.scheduled],
            query_pos_start=[s.num_computed_tokens for s in out.scheduled],
            kv_lens=[s.num_computed_tokens + s.num_new_tokens for s in out.scheduled],
            block_tables=[s.block_ids for s in out.scheduled],
            slot_mapping=slots,
            device=self.device,
        )
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        """Run one step. Returns logits [N, vocab] (float32) for the N scheduled requests
        whose next token is due, in order, and those requests."""
        self.copy_blocks(out.block_copies)
        ids, pos, meta = self.prepare(out)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        due = [s for s in out.scheduled if s.completes_known_tokens]
        if not due:
            return None, []
        ends = meta.query_start_loc[1:].long() - 1
        rows = torch.tensor([i for i, s in enumerate(out.scheduled) if s.completes_known_tokens], device=self.device)
        logits = self.model.compute_logits(hidden[ends[rows]])
        return logits, due
