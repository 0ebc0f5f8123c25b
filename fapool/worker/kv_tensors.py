"""The paged KV cache's tensors on a rank: one (K, V) pair per layer it holds, and the block
copies of copy-on-write. Shared by every role that keeps KV (single process, dense ranks,
AFD attention ranks)."""

from __future__ import annotations

import math

import torch

from fapool.attention.kv_quant import scale_pages

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def lazy_zeros(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`count` zero CPU tensors of `shape` as one [count, *shape] tensor whose memory is taken
    only as it is written: numpy's zeros is a calloc, whose large blocks are fresh zero pages,
    where torch.zeros writes every byte (a 1 GiB KV budget would be resident at start-up)."""
    import numpy as np

    nbytes = count * math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(count, *shape)


def allocate_kv(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> KVCaches:
    """Zeroed (K, V) of `shape` [blocks, block_size, kv heads, head_dim] for each layer."""
    if device.type == "cpu":
        flat = lazy_zeros(2 * num_layers, shape, dtype)
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(num_layers)]
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def allocate_scale_pages(num_layers: int, shape: tuple[int, ...], device: torch.device) -> KVCaches:
    """An int8 cache's per-token (K, V) scales for a cache of `shape`, float32 a layer
    (fapool.attention.kv_quant.scale_pages)."""
    pages = scale_pages(shape)
    if device.type == "cpu":
        flat = lazy_zeros(2 * num_layers, pages, torch.float32)
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(num_layers)]
    return [(torch.zeros(pages, device=device), torch.zeros(pages, device=device)) for _ in range(num_layers)]


def copy_kv_blocks(
    kv_caches: KVCaches, copies: list[tuple[int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Copy-on-write: block src -> dst in every layer. Returns the (src, dst) index tensors
    (None when there is nothing to copy), for state a backend keeps per block."""
    if not copies:
        return None
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
    for k, v in kv_caches:
        k[dst] = k[src]
        v[dst] = v[src]
    return src, dst
