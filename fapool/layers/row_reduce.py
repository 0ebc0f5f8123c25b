"""Argmax and top-k over the rows of wide CPU tensors (a batch's logits) through the maxima of
256-wide chunks: aten's CPU argmax and topk do not vectorise, its amax does."""

from __future__ import annotations

import torch

_CHUNK = 256


def _chunked(x: torch.Tensor) -> bool:
    """Whether the chunked CPU reductions below apply to a [N, V] tensor."""
    return x.device.type == "cpu" and x.is_contiguous() and x.shape[-1] >= 4 * _CHUNK


def _chunk_maxima(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N, ceil(V / 256)]: each 256-wide chunk's maximum (a NaN if it holds one)."""
    rows, n = x.shape
    full = n // _CHUNK * _CHUNK
    maxima = x[:, :full].view(rows, -1, _CHUNK).amax(-1)
    if full < n:
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], dim=1)
    return maxima


def _chunk_columns(chunks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, k] chunk indices -> ([N, k * 256] their columns, clamped to n - 1; where clamped)."""
    cols = chunks[..., None] * _CHUNK + torch.arange(_CHUNK, device=chunks.device)
    past = cols >= n
    return cols.clamp_(max=n - 1).flatten(1), past.flatten(1)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [N, V] tensor, the same index (the first maximum; a NaN counts as the
    maximum), through the chunks' maxima (measured in benchmarks/RESULTS.md, argmax)."""
    if not _chunked(x):
        return x.argmax(dim=-1)
    chunk = _chunk_maxima(x).argmax(dim=-1)  # the first chunk holding the row's maximum (or a NaN)
    # The short last chunk repeats column n-1, whose first copy comes first: the same index.
    cols, _ = _chunk_columns(chunk[:, None], x.shape[1])
    return chunk * _CHUNK + x.gather(1, cols).argmax(dim=-1)


def row_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k largest entries of each row of [N, V] (ties broken either way, as topk's):
    the k chunks with the largest maxima hold a top k, so topk runs over their columns only."""
    if not _chunked(x) or k * _CHUNK >= x.shape[1]:
        return x.topk(k, dim=-1).indices
    cols, past = _chunk_columns(_chunk_maxima(x).topk(k, dim=-1).indices, x.shape[1])
    cand = x.gather(1, cols).masked_fill_(past, float("-inf"))  # a clamped column counts once
    return cols.gather(1, cand.topk(k, dim=-1).indices)
