"""Reference attention in plain PyTorch: the CPU backend and the oracle for GPU kernels.

Computes in float32, except that aten's CPU flash kernel reads a bf16 cache as bf16 (it
accumulates in float32). On the CPU, decode tokens (one query per sequence, every key of its
table visible) and, over a bf16 cache, prefill chunks (causal, each query seeing at least its
sequence's first key) go through the C kernels of cpu_decode, which read the pages in place. Where they
cannot run (no C compiler or AVX-512, an FP8 cache), or off the CPU, decode tokens are batched together over a
padded gather of their blocks; with long contexts on the CPU each goes through PyTorch's CPU
flash attention over its own gathered blocks instead (its query heads of a KV head as the
query rows). Sequences with several queries (prefill chunks) then go one by one
through PyTorch's own flash attention for the CPU, which returns the logsumexp too: a chunk
whose keys end at its last query is its cached prefix (every key visible) plus the chunk
itself (causal), merged by lse; keys wholly before the queries need no mask. Other layouts
take the plain masked matmul (`_attend`).
"""

from __future__ import annotations

import torch

from fapool.attention import cpu_decode
from fapool.attention.backend import AttentionBackend, merge_partials
from fapool.attention.kv_quant import FP8_DTYPE, KVScales, quantize, quantize_int8_rows
from fapool.attention.metadata import AttentionMetadata

_UNIT = KVScales()
# CPU decode rows attend one sequence at a time (each seeing all of its keys) once the longest
# has PER_SEQUENCE_MIN_KEYS keys and the padded batch PER_SEQUENCE_MIN_WORK rows x keys: a
# padded gather that large leaves the cache before the flash call reads it back; below, one
# padded flash call beats the per-sequence calls' overhead (benchmarks/RESULTS.md).
PER_SEQUENCE_MIN_KEYS = 2048
PER_SEQUENCE_MIN_WORK = 16384


# aten splits a copy over its threads above this many elements (at::internal::GRAIN_SIZE).
_GRAIN_SIZE = 32768


def write_kv_torch(k_cache, v_cache, key, value, slot_mapping, scales: KVScales | None = None) -> None:
    scales = scales or _UNIT
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    for cache, x, s, pages, shift in (
        (k_cache, key, scales.k, scales.k_pages, scales.k_shift),
        (v_cache, value, scales.v, scales.v_pages, None),
    ):
        if shift is not None:
            x = x.float() - shift
        if cache.dtype == torch.int8:
            rows, row_scales = quantize_int8_rows(x)
            block_size = cache.shape[1]
            pages[slot_mapping // block_size, :, slot_mapping % block_size] = row_scales
        else:
            rows = quantize(x, s, cache.dtype)
        if cache.dtype == FP8_DTYPE:  # no index_copy_ for e4m3 on CPU: copy the bytes
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        flat = cache.view(-1, *cache.shape[2:])
        if not flat.is_cpu or rows.numel() <= _GRAIN_SIZE:
            flat.index_copy_(0, slot_mapping, rows)
            continue
        # A prefill's rows in serial chunks: two threads taking first-touch page faults on a
        # lazily committed cache at once can stall for milliseconds, far longer than the copy
        # (benchmarks/RESULTS.md).
        step = max(1, _GRAIN_SIZE // rows[0].numel())
        for i in range(0, rows.shape[0], step):
            flat.index_copy_(0, slot_mapping[i : i + step], rows[i : i + step])


def _gather(
    cache: torch.Tensor, table: torch.Tensor, kv_len: int, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """[num_blocks, bs, H, D] gathered through `table` ([..., nb]) -> [..., kv_len, H, D]
    (float32 times `scale` from an FP8 cache, times each token's scale from an int8 cache's
    scale pages). index_select over whole blocks as rows: several times faster on CPU than
    advanced indexing of the 4-d cache."""
    num_blocks, block_size, heads, dim = cache.shape
    nb = (kv_len + block_size - 1) // block_size
    idx = table[..., :nb].long()
    rows = cache.view(num_blocks, -1).index_select(0, idx.reshape(-1))
    g = rows.view(*idx.shape[:-1], nb * block_size, heads, dim)[..., :kv_len, :, :]
    if cache.dtype == torch.int8:  # scale pages [num_blocks, H, bs]
        s = scale.view(num_blocks, -1).index_select(0, idx.reshape(-1)).view(*idx.shape, heads, block_size)
        s = s.transpose(-1, -2).reshape(*idx.shape[:-1], nb * block_size, heads, 1)
        return g.float().mul_(s[..., :kv_len, :, :])
    return g.float().mul_(scale) if cache.dtype == FP8_DTYPE else g


def _flash_dtype(k: torch.Tensor) -> torch.dtype:
    """What aten's CPU flash attention computes in for gathered keys `k`: a bf16 cache stays
    bf16 (the kernel accumulates in float32), so no widened copy of every key is made."""
    return torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32


def _attend(q, k, v, mask, scale):
    """q [B, Tq, Hkv, G, D], k/v [B, L, Hkv, D], mask [B, Tq, L] (True: the query sees the key)
    or None for all visible. Batched matmuls over [B, Hkv] with the G query heads of a KV head
    stacked as rows, so each KV head is read once for its whole group (GQA)."""
    B, Tq, Hkv, G, D = q.shape
    L = k.shape[1]
    qf = q.float().permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    scores = torch.matmul(qf, k.float().permute(0, 2, 3, 1)).mul_(scale).view(B, Hkv, G, Tq, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Tq]
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
    out = torch.matmul(probs.view(B, Hkv, G * Tq, L), v.float().permute(0, 2, 1, 3))
    out = out.view(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4)  # -> [B, Tq, Hkv, G, D]
    return out, lse.permute(0, 3, 1, 2)  # lse -> [B, Tq, Hkv, G]


def _causal_mask(q_pos, k_pos, valid):
    """[B, Tq, L] from q_pos [B, Tq], k_pos [B, L], valid [B, L]; None when all visible."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]
    return None if bool(mask.all()) else mask


class _Plan:
    """What forward derives from the batch alone, once per step instead of once per layer."""

    def __init__(
        self, meta: AttentionMetadata, device, flash_dtype: torch.dtype, native_kernel: bool, cache_dtype: torch.dtype
    ) -> None:
        self.starts = meta.query_start_loc.tolist()
        self.q_pos0 = meta.query_pos_start.tolist()
        self.kv_start = meta.kv_start.tolist()
        self.decode = [s for s, n in enumerate(meta.query_lens_cpu) if n == 1 and meta.kv_lens_cpu[s] > 0]
        self.multi = [s for s, n in enumerate(meta.query_lens_cpu) if n > 1 and meta.kv_lens_cpu[s] > 0]
        self.cpu = str(device).startswith("cpu")
        # The C kernel takes the prefill chunks of a bf16 or int8 cache too, where each one's first
        # query sees its first key (a float32 cache keeps aten's float32 flash kernel: exact HF parity).
        self.native_multi = (
            native_kernel and self.cpu and cache_dtype in (torch.bfloat16, torch.int8) and bool(self.multi)
            and all(self.kv_start[s] <= self.q_pos0[s] for s in self.multi)
        )
        if self.native_multi:
            idx = torch.tensor(self.multi)
            self.multi_tables32 = meta.block_tables[idx].to(torch.int32).contiguous()
            self.multi_rows32 = torch.tensor(
                [[self.starts[s], meta.query_lens_cpu[s], self.q_pos0[s], self.kv_start[s], meta.kv_lens_cpu[s]]
                 for s in self.multi], dtype=torch.int32).t().contiguous()
        if not self.decode:
            return
        idx = torch.tensor(self.decode, device=device)
        self.max_len = max(meta.kv_lens_cpu[s] for s in self.decode)
        self.tok = [self.starts[s] for s in self.decode]
        # Decode rows that are the whole batch, in order: their result is the output as is.
        self.all_decode = self.tok == list(range(meta.num_tokens))
        self.tok_index = torch.tensor(self.tok, device=device)
        lens = [meta.kv_lens_cpu[s] for s in self.decode]
        all_visible = all(self.kv_start[s] + n - 1 <= self.q_pos0[s] for s, n in zip(self.decode, lens))
        # cpu_decode's kernel where it runs (the caller checked the cache), else aten's paths below.
        self.native = native_kernel and self.cpu and all_visible
        if self.native:
            self.tables32 = meta.block_tables[idx].to(torch.int32).contiguous()
            self.lens32 = meta.kv_lens[idx].to(torch.int32).contiguous()
            return
        self.tables = meta.block_tables[idx].long()
        ar = torch.arange(self.max_len, device=device)
        k_pos = meta.kv_start[idx].long()[:, None] + ar[None]
        valid = ar[None] < meta.kv_lens[idx].long()[:, None]
        self.mask = _causal_mask(meta.query_pos_start[idx].long()[:, None], k_pos, valid)  # [n, 1, L]
        # On the CPU, additive and broadcast over a KV head's query rows, for aten's flash kernel.
        self.flash_mask = None
        if self.cpu and self.mask is not None:
            self.flash_mask = torch.zeros(len(self.decode), 1, 1, self.max_len, dtype=flash_dtype).masked_fill(
                ~self.mask[:, :, None, :], float("-inf")
            )
        self.per_seq = (
            all_visible
            and self.cpu
            and self.max_len >= PER_SEQUENCE_MIN_KEYS
            and len(self.decode) * self.max_len >= PER_SEQUENCE_MIN_WORK
        )
        if self.per_seq:
            self.seq_tables = [meta.block_tables[s] for s in self.decode]
            self.seq_lens = lens


def _decode_native(q: torch.Tensor, k_cache, v_cache, plan: _Plan, scale: float, pages=None):
    """Decode rows through cpu_decode's C kernel: q [T, Hkv, G, D] -> (out [n, Hkv*G, D] float32,
    lse [n, Hkv*G]), reading the paged cache in place (an int8 cache with its scale `pages`)."""
    n = len(plan.decode)
    qd = q if plan.all_decode else q[plan.tok_index]
    o, lse = cpu_decode.decode_attention(
        cpu_decode.load(), (qd.float() * scale).contiguous(), k_cache, v_cache, plan.tables32, plan.lens32,
        plan.max_len, pages,
    )
    return o.view(n, -1, o.shape[-1]), lse.view(n, -1)


def _decode_each(q: torch.Tensor, k_cache, v_cache, plan: _Plan, scale: float, sk: float, sv: float):
    """Decode rows one sequence at a time: q [T, Hkv, G, D] -> (out [n, Hkv*G, D], lse [n, Hkv*G])
    for the plan's decode rows, every key visible. The G query heads of a KV head are the query
    rows of one flash call, so no KV head is repeated."""
    outs, lses = [], []
    for tok, table, n in zip(plan.tok, plan.seq_tables, plan.seq_lens):
        k = _gather(k_cache, table, n, sk)
        dt = _flash_dtype(k)
        k = k.to(dt).unsqueeze(0).transpose(1, 2)  # [1, Hkv, n, D], strided
        v = _gather(v_cache, table, n, sv).to(dt).unsqueeze(0).transpose(1, 2)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[tok].to(dt).unsqueeze(0), k, v, 0.0, False, scale=scale
        )[:2]
        outs.append(o[0])
        lses.append(lse[0])
    out, lse = torch.stack(outs), torch.stack(lses)
    return out.view(out.shape[0], -1, out.shape[-1]), lse.view(lse.shape[0], -1)


def _decode_padded(q: torch.Tensor, k_cache, v_cache, plan: _Plan, scale: float, sk: float, sv: float):
    """Decode rows as one padded batch: q [T, Hkv, G, D] -> (out [n, Hkv*G, D], lse [n, Hkv*G]).
    On the CPU one flash call, a KV head's G query heads its query rows and the padding masked
    out (every decode row sees at least its own key); elsewhere the masked matmuls."""
    n = len(plan.decode)
    qd = q if plan.all_decode else q[plan.tok_index]
    k = _gather(k_cache, plan.tables, plan.max_len, sk)
    v = _gather(v_cache, plan.tables, plan.max_len, sv)
    if plan.cpu:
        dt = _flash_dtype(k)
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qd.to(dt),
            k.to(dt).transpose(1, 2),
            v.to(dt).transpose(1, 2),
            0.0,
            False,
            attn_mask=plan.flash_mask,
            scale=scale,
        )[:2]
        return o.reshape(n, -1, o.shape[-1]), l.reshape(n, -1)
    o, l = _attend(qd.unsqueeze(1), k, v, plan.mask, scale)
    return o[:, 0].reshape(n, -1, o.shape[-1]), l[:, 0].reshape(n, -1)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """q [Tq, H, D], k/v [L, Hkv, D] -> (out [Tq, H, D] in _flash_dtype(k), lse [Tq, H] float32)
    by aten's CPU flash attention (causal: query i sees keys 0..i, the chunk's own keys)."""
    group, dt = q.shape[1] // k.shape[1], _flash_dtype(k)
    qh = q.to(dt).transpose(0, 1).unsqueeze(0)
    kh = k.to(dt).repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    vh = v.to(dt).repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, causal, scale=scale
    )[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def _attend_chunk(q, k, v, q_pos0: int, kv_start: int, scale: float):
    """A multi-query row, q [Tq, H, D] at positions q_pos0.., over k/v [L, Hkv, D] at
    kv_start..: the flash paths where the layout allows, else None."""
    tq, kv_len = q.shape[0], k.shape[0]
    if q.device.type != "cpu":
        return None
    if kv_start + kv_len - 1 <= q_pos0:  # every key at or before the first query
        return _flash(q, k, v, False, scale)
    if kv_start + kv_len == q_pos0 + tq and kv_len >= tq:  # a cached prefix, then the chunk
        out, lse = _flash(q, k[kv_len - tq :], v[kv_len - tq :], True, scale)
        if kv_len == tq:
            return out, lse
        prefix_out, prefix_lse = _flash(q, k[: kv_len - tq], v[: kv_len - tq], False, scale)
        return merge_partials([prefix_out, out], [prefix_lse, lse])
    return None


def decode_plan(backend: AttentionBackend, meta: AttentionMetadata, k_cache: torch.Tensor, group: int) -> _Plan:
    """The step's plan, made by the first layer that asks and kept in the metadata."""
    plan = meta.host_plans.get(backend.name)
    if plan is None:
        native = cpu_decode.supports(k_cache, group) and cpu_decode.load() is not None
        plan = meta.host_plans[backend.name] = _Plan(meta, k_cache.device, _flash_dtype(k_cache), native, k_cache.dtype)
    return plan


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping, scales=None) -> None:
        # One C call for the step's rows on the CPU (it leaves 8-bit caches, which need scales, alone).
        lib = cpu_decode.load() if k_cache.device.type == "cpu" else None
        if lib is None or not cpu_decode.write_kv(lib, k_cache, v_cache, key, value, slot_mapping):
            write_kv_torch(k_cache, v_cache, key, value, slot_mapping, scales)

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, scales=None, new_kv=None
    ):
        scales = scales or _UNIT
        int8 = k_cache.dtype == torch.int8  # per-token scales: the pages go where a float would
        sk, sv = (scales.k_pages, scales.v_pages) if int8 else (scales.k, scales.v)
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        plan = decode_plan(self, meta, k_cache, group)
        q = query.view(num_tokens, num_kv_heads, group, head_dim)
        if plan.decode:
            if plan.native:
                o, l = _decode_native(q, k_cache, v_cache, plan, scale, (sk, sv) if int8 else None)
            elif plan.per_seq:
                o, l = _decode_each(q, k_cache, v_cache, plan, scale, sk, sv)
            else:
                o, l = _decode_padded(q, k_cache, v_cache, plan, scale, sk, sv)
            if plan.all_decode:
                return o.to(query.dtype), l
        out = torch.zeros((num_tokens, num_heads, head_dim), dtype=torch.float32, device=query.device)
        lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=query.device)
        if plan.decode:
            out[plan.tok_index], lse[plan.tok_index] = o.to(out.dtype), l

        if plan.native_multi:
            qs = (query.float() * scale).view(num_tokens, num_kv_heads, group, head_dim).contiguous()
            cpu_decode.prefill_attention(
                cpu_decode.load(), qs, k_cache, v_cache, plan.multi_tables32, plan.multi_rows32, out, lse,
                (sk, sv) if int8 else None,
            )
            return out.to(query.dtype), lse
        starts, q_pos0, kv_start = plan.starts, plan.q_pos0, plan.kv_start
        for s in plan.multi:
            a, b = starts[s], starts[s + 1]
            kv_len = meta.kv_lens_cpu[s]
            k = _gather(k_cache, meta.block_tables[s], kv_len, sk)
            v = _gather(v_cache, meta.block_tables[s], kv_len, sv)
            fast = _attend_chunk(query[a:b], k, v, q_pos0[s], kv_start[s], scale)
            if fast is not None:
                out[a:b], lse[a:b] = fast
                continue
            k_pos = (kv_start[s] + torch.arange(kv_len, device=query.device))[None]
            q_pos = (q_pos0[s] + torch.arange(b - a, device=query.device))[None]
            mask = _causal_mask(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool))
            o, l = _attend(q[a:b].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, scale)
            out[a:b] = o[0].reshape(b - a, num_heads, head_dim)
            lse[a:b] = l[0].reshape(b - a, num_heads)
        return out.to(query.dtype), lse
