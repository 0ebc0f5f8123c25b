"""CPU paged decode attention in C (cpu_decode.c), built and loaded by fapool.native. aten's
CPU flash kernel pays a fixed cost per (sequence, KV head) and needs the keys gathered out of
the pages first; this reads the pages in place. Where the build fails or the CPU lacks AVX-512,
`load()` returns None and the caller keeps the aten path."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fapool import native
from fapool.attention.kv_quant import check_scale_pages

SOURCE = Path(__file__).with_name("cpu_decode.c")
SPLIT_MIN_KEYS = 512  # shorter sequences are not worth a partial result and a merge
MAX_PARTS = 64  # as in cpu_decode.c


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.build(SOURCE)
    if lib is None or not lib.fapool_decode_supported():
        return None
    fn = lib.fapool_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn = lib.fapool_decode_attention_int8
    fn.restype = ctypes.c_int
    fn.argtypes = [*[ctypes.c_void_p] * 6, ctypes.c_int, ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int]
    fn = lib.fapool_write_kv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    fn = lib.fapool_prefill_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 4, ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.fapool_prefill_attention_int8
    fn.restype = ctypes.c_int
    fn.argtypes = [*[ctypes.c_void_p] * 6, ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 4,
                   ctypes.c_void_p, ctypes.c_void_p]
    return lib


def supports(k_cache: torch.Tensor, num_query_per_kv: int) -> bool:
    """The cache layouts and sizes the C kernel was written for."""
    _, block_size, _, head_dim = k_cache.shape
    return (
        k_cache.device.type == "cpu"
        and k_cache.dtype in (torch.bfloat16, torch.float32, torch.int8)
        and k_cache.is_contiguous()
        and head_dim <= 256
        and head_dim % 2 == 0  # the bf16 prefill kernel takes head-dim elements in pairs
        and num_query_per_kv <= 16
        and block_size <= 16
    )


def split_parts(num_seqs: int, max_len: int) -> int:
    """Ranges each sequence's blocks are split into: fewer long sequences than threads leave
    threads idle, so each sequence's blocks are spread over them (flash-decoding)."""
    threads = torch.get_num_threads()
    return min(threads // num_seqs, MAX_PARTS) if num_seqs < threads and max_len >= SPLIT_MIN_KEYS else 1


def _call(lib: ctypes.CDLL, name: str, q, k_cache, v_cache, pages, *rest) -> int:
    """The C kernel `name` over a bf16 / float32 cache, or `name`_int8 with an int8 cache's (K, V)
    scale pages; `rest` are the arguments after the caches."""
    if k_cache.dtype == torch.int8:
        check_scale_pages(k_cache, *pages)
        k, v = pages
        return getattr(lib, name + "_int8")(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(),
                                            v.data_ptr(), *rest)
    return getattr(lib, name)(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
                              *rest)


def decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [n, Hkv, G, D] float32, contiguous, already times the softmax scale
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [n, width] int32, contiguous
    lens: torch.Tensor,  # [n] int32, each > 0
    max_len: int,
    pages: tuple[torch.Tensor, torch.Tensor] | None = None,  # an int8 cache's (K, V) scale pages
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [n, Hkv, G, D] float32, lse [n, Hkv, G] float32) over every key of each row's table."""
    n, heads, group, dim = q.shape
    parts = split_parts(n, max_len)
    out = torch.empty_like(q)
    lse = torch.empty(n, heads, group, dtype=torch.float32)
    rc = _call(lib, "fapool_decode_attention", q, k_cache, v_cache, pages, tables.data_ptr(), tables.shape[1],
               lens.data_ptr(), n, heads, group, dim, k_cache.shape[1], out.data_ptr(), lse.data_ptr(), parts)
    if rc == -2:
        raise MemoryError("cpu_decode: no memory for the split sequences' partial results")
    if rc != 0:
        raise ValueError(f"cpu_decode: sizes out of range (D {dim}, {heads} x {group} heads, block size {k_cache.shape[1]})")
    return out, lse


def prefill_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [T, Hkv, G, D] float32, contiguous, already times the softmax scale
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [n, width] int32, contiguous: the multi-token sequences' tables
    rows: torch.Tensor,  # [5, n] int32: q_start, q_len, q_pos0, kv_start, kv_len per sequence
    out: torch.Tensor,  # [T, Hkv * G, D] float32, contiguous: the sequences' rows are written
    lse: torch.Tensor,  # [T, Hkv * G] float32
    pages: tuple[torch.Tensor, torch.Tensor] | None = None,  # an int8 cache's (K, V) scale pages
) -> None:
    """Causal attention of each sequence's query tokens over its paged keys (the first token
    seeing at least the first key), written into its rows of out and lse. bf16 dot products:
    q and P rounded to bf16, an int8 cache's rows widened to bf16 (exactly)."""
    _, heads, group, dim = q.shape
    rc = _call(lib, "fapool_prefill_attention", q, k_cache, v_cache, pages, tables.data_ptr(), tables.shape[1],
               rows.shape[1], *(rows[i].data_ptr() for i in range(5)), heads, group, dim, k_cache.shape[1],
               out.data_ptr(), lse.data_ptr())
    if rc != 0:
        raise ValueError(f"cpu_decode: sizes out of range (D {dim}, {heads} x {group} heads, block size {k_cache.shape[1]})")


def write_kv(lib: ctypes.CDLL, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, slots: torch.Tensor) -> bool:
    """Copy the step's K / V rows [T, Hkv, D] into the caches' slots (slots < 0 skipped) where
    one C call can (CPU, the cache's dtype, each token's heads contiguous, int64 slots); False
    where it cannot and the caller's path must."""
    ok = (
        key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and key.stride()[1:] == value.stride()[1:] == (key.shape[2], 1)
        and slots.dtype == torch.int64 and slots.is_contiguous() and slots.device.type == "cpu"
    )
    if ok:
        lib.fapool_write_kv(k_cache.data_ptr(), v_cache.data_ptr(), key.data_ptr(), key.stride(0) * key.element_size(),
                            value.data_ptr(), value.stride(0) * value.element_size(), slots.data_ptr(), key.shape[0],
                            key.shape[1] * key.shape[2] * key.element_size())
    return ok
