"""Runs the model on one worker: owns the paged KV cache tensors, turns a SchedulerOutput into
a flat token batch with attention metadata, and returns the logits of the requests whose
next token is due. It makes no scheduling decisions.

On a GPU with the Triton backend, decode-only steps replay CUDA graphs (fapool.worker.cuda_graphs)
and the model's norm, rotary and activation ops run as fused kernels (fapool.layers.fused);
prefill and mixed steps run eagerly. On the CPU nothing of this applies.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace

import torch

from fapool.attention.backend import AttentionBackend, KVScales
from fapool.attention.kv_quant import cache_dtype, calibrate_kv_scales, is_fp8
from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput
from fapool.layers.sampler import DeviceLogprobs, compute_logprobs, logprob_lists, sample_tokens
from fapool.layers.sampling_batch import SamplingBatch
from fapool.outputs import Logprob
from fapool.request import Request
from fapool.worker.cuda_graphs import DecodeGraphs
from fapool.worker.kv_tensors import allocate_kv, allocate_scale_pages, copy_kv_blocks
from fapool.worker.step_plan import plan_micro_batch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CPU_KV_BYTES = 1 << 30
KV_CALIBRATION_TOKENS = 512


@dataclass
class PendingTokens:
    """Sampled tokens (and logprobs) of a launched step, on their way to the host (async
    scheduling). A token of -1: sampling failed for that row (a NaN logit)."""

    due: list[ScheduledRequest]  # one token each, in order
    host: torch.Tensor  # int64 [len(due)]; pinned and filled by a non-blocking copy on CUDA
    ready: object | None  # has synchronize(): a CUDA event after those copies, a future; None: there
    host_logprobs: DeviceLogprobs | None = None  # host copies, when a row asked for logprobs

    def tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def logprobs(self, tokens: list[int]) -> list[list[Logprob] | None]:
        """Per due row, given tokens(): its logprob entries, or None where none were asked."""
        if self.host_logprobs is None:  # no row asked
            return [None] * len(tokens)
        asked = [s.request.params.logprobs for s in self.due]
        return logprob_lists(tokens, self.host_logprobs, asked)


def to_host(tokens: torch.Tensor, logprobs: DeviceLogprobs | None, due: list[ScheduledRequest]) -> PendingTokens:
    """Start copying a step's tokens and logprobs to the host; on CUDA without waiting."""
    if tokens.device.type != "cuda":
        return PendingTokens(due, tokens, None, logprobs)

    def pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    host_lps = None
    if logprobs is not None:
        host_lps = DeviceLogprobs(pinned(logprobs.chosen), pinned(logprobs.top_values), pinned(logprobs.top_ids))
    host = pinned(tokens)
    ready = torch.cuda.Event()
    ready.record()
    return PendingTokens(due, host, ready, host_lps)


@dataclass
class LaunchedForward:
    """A launched step's forward pass (ModelRunner.launch_forward): its due requests and their
    logits on the device; from a decode graph also the tokens it drew inside the graph, one per
    scheduled request (due ones at `due_rows`), and the logprobs they ask for."""

    due: list[ScheduledRequest]
    logits: torch.Tensor  # [len(due), vocab] float32
    rows: list  # each due request's sampling row, taken at launch (Request.sampling_row)
    graph_sampled: torch.Tensor | None = None
    due_rows: list[int] = field(default_factory=list)
    graph_logprobs: int | None = None  # SamplingBatch.logprobs of the graph's rows


class ModelRunner:
    worker_num_blocks: int | None = None  # KV blocks of each attention worker (a pool's runners)
    # CPU: float32 linears through oneDNN with packed weights (fapool.layers.cpu_linear), or
    # quantized (fapool.layers.cpu_quant, single process only). A multi-rank driver shards the
    # dense weights later, so it keeps them as they are.
    pack_cpu_linears = True

    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> None:
        self.config = config
        self.model = model
        self.backend = backend
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.kv_dtype = cache_dtype(self.dtype, config.cache.kv_cache_dtype)
        self.block_size = config.cache.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Processes holding KV on this GPU (worker ranks sharing it over gloo): they split
        # the profiled budget evenly, so together they stay within gpu_memory_utilization.
        self.ranks_on_device = 1
        on_gpu = self.device.type == "cuda"
        # Decode steps through CUDA graphs: the Triton kernels never sync with the host, the
        # torch reference's KV write does, so graphs need a graph-safe backend (Triton, or the
        # sparse backend over it).
        self.use_cuda_graphs = on_gpu and getattr(backend, "graph_safe", False) and not config.enforce_eager
        self.decode_graphs: DecodeGraphs | None = None
        # The last launched step's sampled tokens (device) and each due request's row in them:
        # where the next step reads a token the host does not have yet.
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[str, int] = {}
        if on_gpu:
            from fapool.layers.fused import fuse_model

            fuse_model(model)
        elif config.quantization is not None:
            from fapool.layers.cpu_fused import fuse_cpu_model
            from fapool.layers.cpu_quant import quantize_linears, quantized_kv_dtype
            from fapool.layers.cpu_stack import DecodeStack

            quantize_linears(model, config.quantization)
            fuse_cpu_model(model)
            DecodeStack.attach(model)
            if config.cache.kv_cache_dtype == "auto":
                self.kv_dtype = quantized_kv_dtype(self.dtype)
        elif self.pack_cpu_linears:
            from fapool.layers.cpu_linear import pack_linears

            pack_linears(model)
        if is_fp8(config.cache.kv_cache_dtype) or config.cache.kv_cache_dtype == "int8":
            self.calibrate_kv_scales()

    # KV cache -----------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.config.model
        extra = getattr(self.backend, "summary_tokens_per_block", 0)  # sparse: key min/max per block
        scales = 2 * m.num_hidden_layers * m.num_key_value_heads * 4 if self.kv_dtype == torch.int8 else 0
        return (m.kv_bytes_per_token(self.kv_dtype.itemsize) + scales) * self.block_size + (
            m.kv_bytes_per_token(self.kv_dtype.itemsize) * extra
        )

    def determine_num_blocks(self, bytes_per_block: int | None = None) -> int:
        """Blocks that fit the KV budget: an explicit count, kv_cache_memory bytes, or (GPU)
        gpu_memory_utilization of the card minus what weights and a profiled forward use.
        `bytes_per_block`: the size of a block of another holder of this model's KV (an
        attention worker's, next to tensor-parallel dense ranks); default this runner's."""
        cache = self.config.cache
        block_bytes = bytes_per_block or self.bytes_per_block()
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget() // self.ranks_on_device
        else:
            budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) holds no block of {block_bytes} bytes; "
                "raise kv_cache_memory or gpu_memory_utilization"
            )
        return int(num_blocks)

    def _profile_gpu_budget(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.scheduler.max_num_batched_tokens, self.config.max_model_len)
        # A forward at the full token budget with a throwaway one-block-per-16-tokens cache
        # measures peak activation memory.
        self._forward_once(torch.zeros(n, dtype=torch.long), self.kv_dtype)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        used_elsewhere = (
            total - torch.cuda.mem_get_info(self.device)[0] - torch.cuda.memory_reserved(self.device)
        )
        return int(total * self.config.cache.gpu_memory_utilization - peak - max(0, used_elsewhere))

    def _forward_once(self, ids: torch.Tensor, kv_dtype: torch.dtype) -> None:
        """One prefill of `ids` over a throwaway cache of `kv_dtype` (released after)."""
        n = ids.numel()
        nb = -(-n // self.block_size) + 1
        self.allocate_kv_cache(nb, kv_dtype)
        meta = AttentionMetadata.build([n], [0], [n], [list(range(nb))], list(range(n)), device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids.to(self.device), torch.arange(n, device=self.device), self.kv_caches, meta)
            self.model.compute_logits(hidden[-1:])
        self.kv_caches = []

    def calibrate_kv_scales(self) -> None:
        """8-bit KV: per-layer FP8 scales, or int8's K channel means, from the K/V of one prefill
        in the model's dtype over seeded random tokens after BOS (a fixed input, so every start
        gets the same values)."""
        m = self.config.model
        n = min(KV_CALIBRATION_TOKENS, self.config.max_model_len)
        ids = torch.randint(0, m.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        if m.bos_token_id is not None:
            ids[0] = m.bos_token_id
        layers = [layer.self_attn for layer in self.model.model.layers]
        kv_cache_dtype = self.config.cache.kv_cache_dtype
        scales = calibrate_kv_scales(layers, lambda: self._forward_once(ids, self.dtype), kv_cache_dtype)
        if kv_cache_dtype != "int8":
            logger.info("FP8 KV scales (k, v) per layer: %s", [(round(s.k, 5), round(s.v, 5)) for s in scales])

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        self.decode_graphs = None  # captured over the old cache tensors
        m = self.config.model
        shape = (num_blocks, self.block_size, m.num_key_value_heads, m.head_dim)
        dtype = dtype or self.kv_dtype
        self.kv_caches = allocate_kv(m.num_hidden_layers, shape, dtype, self.device)
        if dtype == torch.int8:  # per-token scales beside the cache, read through the layers' kv_scales
            pages = allocate_scale_pages(m.num_hidden_layers, shape, self.device)
            for layer, (kp, vp) in zip(self.model.model.layers, pages):  # the calibrated shift kept
                layer.self_attn.kv_scales = replace(layer.self_attn.kv_scales or KVScales(), k_pages=kp, v_pages=vp)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer."""
        copied = copy_kv_blocks(self.kv_caches, copies, self.device)
        if copied is None:
            return
        src, dst = copied
        for layer in getattr(getattr(self.model, "model", None), "layers", ()):
            scales = layer.self_attn.kv_scales
            if scales is not None and scales.k_pages is not None:  # an int8 cache's per-token scales
                scales.k_pages[dst] = scales.k_pages[src]
                scales.v_pages[dst] = scales.v_pages[src]
            # State a backend keeps per block beside the cache (sparse decode's key summaries).
            copy = getattr(layer.self_attn.backend, "copy_block_state", None)
            if copy is not None:
                copy(src, dst)

    # Forward ------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        plan = plan_micro_batch(out.scheduled, self.block_size)
        meta = AttentionMetadata.build(device=self.device, **plan.local_meta_args)
        ids = self._to_device(torch.tensor(plan.input_ids, dtype=torch.long))
        if plan.placeholders:  # tokens sampled by the step still in flight: a device gather
            at = [row for row, _ in plan.placeholders]
            prev = [self._prev_row(req) for _, req in plan.placeholders]
            at_t, prev_t = (self._to_device(torch.tensor(c, dtype=torch.long)) for c in (at, prev))
            ids[at_t] = self._prev_tokens.index_select(0, prev_t)  # type: ignore[union-attr]
        pos = self._to_device(torch.tensor(plan.positions, dtype=torch.long))
        return ids, pos, meta

    def _prev_row(self, req: Request) -> int:
        row = self._prev_rows.get(req.request_id)
        if row is None or req.num_tokens_with_placeholders - req.num_tokens != 1:
            raise RuntimeError(f"request {req.request_id}: input token is neither known nor in flight")
        return row

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        """Run one step. Returns logits [N, vocab] (float32) for the N scheduled requests
        whose next token is due, in order, and those requests."""
        self.copy_blocks(out.block_copies)
        due_rows = [i for i, s in enumerate(out.scheduled) if s.completes_known_tokens]
        due = [out.scheduled[i] for i in due_rows]
        graphs = self._graphs_for(out)
        self._prev_rows = {}  # a synchronous step: every input token is on the host
        if graphs is not None:
            logits = graphs.run(out.scheduled)  # one row per request
            if len(due_rows) < len(out.scheduled):  # a one-token prompt chunk that is not the last
                logits = logits[self._to_device(torch.tensor(due_rows, dtype=torch.long))]
            return (logits if due else None), due
        ids, pos, meta = self.prepare(out)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        self._prompt_logprobs(out.scheduled, hidden)
        if not due:
            return None, []
        ends = list(itertools.accumulate(s.num_new_tokens for s in out.scheduled))  # exclusive ends
        rows = torch.tensor([ends[i] - 1 for i in due_rows], dtype=torch.long)
        return self.model.compute_logits(hidden[self._to_device(rows)]), due

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor) -> None:
        """For requests that ask: the logits at each computed prompt position p score prompt
        token p + 1; its logprob and the top alternatives go to request.prompt_logprobs[p + 1]
        (a recomputation after preemption writes the same values again)."""
        start = 0
        for s in scheduled:
            req, first = s.request, s.num_computed_tokens
            last = min(first + s.num_new_tokens, req.num_prompt_tokens - 1)  # exclusive
            if req.prompt_logprobs is not None and first < last:
                logits = self.model.compute_logits(hidden[start : start + last - first])
                targets = req.prompt_token_ids[first + 1 : last + 1]
                k = req.params.prompt_logprobs
                lps = compute_logprobs(logits, self._to_device(torch.tensor(targets)), k)
                lps = DeviceLogprobs(lps.chosen.cpu(), lps.top_values.cpu(), lps.top_ids.cpu())
                req.prompt_logprobs[first + 1 : last + 1] = logprob_lists(targets, lps, [k] * len(targets))
            start += s.num_new_tokens

    def launch(self, out: SchedulerOutput) -> PendingTokens:
        """Run one step, sampling on the device (fapool.layers.sampler), and return without
        waiting for it. The sampled tokens stay on the device as the next step's inputs (for
        requests whose last token is a placeholder) and are copied to the host in the
        background, with the logprobs rows ask for."""
        return self.launch_sample(self.launch_forward(out))

    @torch.inference_mode()
    def launch_forward(self, out: SchedulerOutput) -> LaunchedForward:
        """The first half of `launch`: the forward pass up to the due rows' logits, queued on
        the device. Between the halves the engine may edit those logits in place (penalties,
        biases, grammar masks: LLMEngine._launch)."""
        self.copy_blocks(out.block_copies)
        scheduled = out.scheduled
        all_due = all(s.completes_known_tokens for s in scheduled)  # a decode step's case
        if all_due:
            due_rows, due = list(range(len(scheduled))), list(scheduled)
        else:
            due_rows = [i for i, s in enumerate(scheduled) if s.completes_known_tokens]
            due = [scheduled[i] for i in due_rows]
        rows = [s.request.sampling_row() for s in due]
        graphs = self._graphs_for(out)
        if graphs is None:
            ids, pos, meta = self.prepare(out)
            hidden = self.model(ids, pos, self.kv_caches, meta)
            ends = list(itertools.accumulate(s.num_new_tokens for s in out.scheduled))
            last = self._to_device(torch.tensor([ends[i] - 1 for i in due_rows], dtype=torch.long))
            return LaunchedForward(due, self.model.compute_logits(hidden[last]), rows)
        if all_due:
            graph_rows = rows
        else:
            per_row = iter(rows)
            graph_rows = [next(per_row) if s.completes_known_tokens else None for s in scheduled]
        logits = graphs.run(scheduled, self._prev_tokens, self._prev_rows, graph_rows)
        if not all_due and due_rows != list(range(len(due_rows))):  # a one-token prompt chunk, not the last
            logits = logits[self._to_device(torch.tensor(due_rows, dtype=torch.long))]
        return LaunchedForward(due, logits, rows, graphs.sampled, due_rows, graphs.last_logprobs)

    def tokens_in_flight(self) -> tuple[torch.Tensor | None, dict[str, int]]:
        """The last launched step's sampled tokens (on the device) and each due request's row in
        them: between launch_forward and launch_sample, the tokens the host may not have yet."""
        return self._prev_tokens, self._prev_rows

    @torch.inference_mode()
    def launch_sample(self, fwd: LaunchedForward, edited: bool = False) -> PendingTokens:
        """The second half of `launch`: the due rows' tokens, drawn on the device (inside the
        decode graph already, unless the logits were edited after it ran)."""
        due = fwd.due
        if fwd.graph_sampled is not None and not edited:
            sampled, rows, asked = fwd.graph_sampled, fwd.due_rows, fwd.graph_logprobs
            if rows == list(range(len(due))):
                mine = sampled[: len(due)]
            else:
                mine = sampled[self._to_device(torch.tensor(rows, dtype=torch.long))]
        else:
            batch = SamplingBatch.build(fwd.rows, fwd.logits.shape[-1], self.device)
            sampled = mine = sample_tokens(fwd.logits, batch)
            rows, asked = list(range(len(due))), batch.logprobs
        self._prev_tokens = sampled
        self._prev_rows = {s.request.request_id: r for s, r in zip(due, rows)}
        lps = compute_logprobs(fwd.logits, mine, asked) if asked is not None and due else None
        return to_host(mine, lps, due)

    def _graphs_for(self, out: SchedulerOutput) -> DecodeGraphs | None:
        """The decode graphs, when this step is one they can run: every request has exactly one
        new token, all its KV is local, and the batch fits the largest graph."""
        if not self.use_cuda_graphs or not self.kv_caches:
            return None
        for s in out.scheduled:
            if s.num_new_tokens != 1 or s.segments:
                return None
        if self.decode_graphs is None:
            sched = self.config.scheduler
            self.decode_graphs = DecodeGraphs(
                self.model,
                self.backend,
                self.kv_caches,
                sched.max_num_seqs,
                self.config.max_model_len,
                self.block_size,
            )
        if self.decode_graphs.padded_size(len(out.scheduled)) is None:
            return None
        return self.decode_graphs
