"""The Triton attention backend (GPU): paged decode, paged prefill, and the KV write.

Triton is imported only when a kernel is first needed, so this module imports on machines
without Triton or a GPU (CI); `triton_available()` says whether the kernels can run.

Dispatch: a decode-only batch (every sequence has one query token) goes to the split-KV
decode kernel. A batch with longer query chunks goes to the prefill kernel; if it also holds
decode sequences, those go to the decode kernel and the prefill kernel skips them, so both
write disjoint rows of one output. Long prefill chunks whose KV here ends with the chunk go to
cuDNN (`fapool.attention.cudnn_prefill`), faster there than the Triton kernel, which skips them.
"""

from __future__ import annotations

import importlib.util

import torch

from fapool.attention import cudnn_prefill
from fapool.attention.backend import AttentionBackend
from fapool.attention.metadata import AttentionMetadata

# Query chunks of this many tokens and causal query-key pairs (per head) go to cuDNN where it
# is usable: below, its fixed cost per call loses to the Triton kernel (the crossover measured by
# benchmarks/bench_attention_kernels.py on GQA 32/8, d128; figures in benchmarks/RESULTS.md).
CUDNN_MIN_QUERY_LEN = 512
CUDNN_MIN_PAIRS = 8 << 20


def triton_available() -> bool:
    """True when Triton is installed and a CUDA device is visible."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


class TritonBackend(AttentionBackend):
    name = "triton"
    graph_safe = True

    def __init__(
        self,
        num_splits: int | None = None,
        cudnn_min_query_len: int | None = CUDNN_MIN_QUERY_LEN,
        cudnn_min_pairs: int = CUDNN_MIN_PAIRS,
    ) -> None:
        # num_splits pins the decode split count (CUDA graphs need a fixed grid), warp_split the
        # decode kernel (triton_decode.fp8_warp_split); None chooses them per call from the batch
        # and the longest context. cudnn_min_query_len None keeps every prefill on the Triton kernel.
        self.num_splits = num_splits
        self.warp_split: bool | None = None
        self.cudnn_min_query_len = cudnn_min_query_len
        self.cudnn_min_pairs = cudnn_min_pairs

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping, scales=None) -> None:
        from fapool.attention.triton_kv_write import write_kv

        write_kv(k_cache, v_cache, key, value, slot_mapping, scales)

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, scales=None, new_kv=None
    ):
        from fapool.attention.triton_decode import paged_decode
        from fapool.attention.triton_prefill import paged_prefill

        num_tokens, num_heads, _ = query.shape
        if num_tokens and not meta.is_decode_only:
            to_cudnn, skip, rest_max = self._cudnn_share(query, k_cache, meta)
            if to_cudnn and new_kv is not None and meta.num_seqs == 1 and meta.kv_lens_cpu[0] == num_tokens:
                # One fresh sequence: cuDNN on the new K/V, its output returned as is (no copies).
                return cudnn_prefill.attend(query, *new_kv, scale, causal=True)
        out = torch.empty_like(query)
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=query.device)
        if num_tokens == 0:
            return out, lse
        kv = {"k_scale": scales.k, "v_scale": scales.v, "k_pages": scales.k_pages, "v_pages": scales.v_pages} if scales else {}
        if meta.is_decode_only:
            return paged_decode(
                query, k_cache, v_cache, meta, scale, out, lse, num_splits=self.num_splits,
                warp_split=self.warp_split, **kv
            )
        has_decode = any(n == 1 for n in meta.query_lens_cpu)
        if has_decode:
            paged_decode(
                query, k_cache, v_cache, meta, scale, out, lse, num_splits=self.num_splits,
                warp_split=self.warp_split, **kv
            )
        if to_cudnn:
            cudnn_prefill.prefill(query, k_cache, v_cache, meta, scale, to_cudnn, out, lse, new_kv)
        if rest_max > 1:
            paged_prefill(
                query,
                k_cache,
                v_cache,
                meta,
                scale,
                out,
                lse,
                skip_decode=has_decode,
                skip=skip,
                max_query_len=rest_max,
                **kv,
            )
        return out, lse

    def _cudnn_share(self, query, k_cache, meta: AttentionMetadata):
        """(sequences cuDNN takes, the Triton kernel's skip mask or None, the longest chunk left to
        the Triton kernel), derived once per batch and kept for every layer."""
        key = ("cudnn", self.cudnn_min_query_len, self.cudnn_min_pairs)
        share = meta.host_plans.get(key)
        if share is None:
            seqs = []
            if self.cudnn_min_query_len is not None and cudnn_prefill.usable(query, k_cache):
                seqs = cudnn_prefill.plan(meta, self.cudnn_min_query_len, self.cudnn_min_pairs)
            taken = set(seqs)
            rest = [n for s, n in enumerate(meta.query_lens_cpu) if s not in taken]
            skip = None
            if seqs:
                mask = torch.zeros(meta.num_seqs, dtype=torch.int8)
                mask[seqs] = 1
                skip = mask.to(query.device, non_blocking=True)
            share = meta.host_plans[key] = (seqs, skip, max(rest, default=0))
        return share
