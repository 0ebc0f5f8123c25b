"""Repetition, presence and frequency penalties in one Triton launch (CUDA): a program per
(penalised row, vocab block) reads the row's logits and its request's slot of the editor's
device state (output-token counts, the prompt's tokens) and writes the penalised logits in
place. fapool.layers.logits_processors' torch code is the reference and the CPU path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocab entries a program


@triton.jit
def _penalties_kernel(
    logits_ptr, logits_stride, rows_ptr, slots_ptr, counts_ptr, seen_ptr, state_stride,
    rep_ptr, freq_ptr, pres_ptr, add_ptr, flight_ptr, frow_ptr, vocab,
    BLOCK: tl.constexpr, HAS_FLIGHT: tl.constexpr,
):
    i = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < vocab
    row = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    rep = tl.load(rep_ptr + i)
    freq = tl.load(freq_ptr + i)
    pres = tl.load(pres_ptr + i)
    # The one output token this row adds to its counts first (-1: none): from the host, or
    # the in-flight step's token of row frow. The program whose block holds it writes it back.
    t = tl.load(add_ptr + i)
    if HAS_FLIGHT:
        frow = tl.load(frow_ptr + i)
        t = tl.where(frow >= 0, tl.load(flight_ptr + tl.maximum(frow, 0)), t)
    x = tl.load(logits_ptr + row * logits_stride + offs, mask=m)
    c = tl.load(counts_ptr + slot * state_stride + offs, mask=m, other=0)
    c = c + (offs == t).to(c.dtype)
    mine = (t >= start) & (t < start + BLOCK) & (t < vocab)
    tl.store(counts_ptr + slot * state_stride + t, tl.sum(tl.where(offs == t, c, 0)), mask=mine)
    seen = tl.load(seen_ptr + slot * state_stride + offs, mask=m, other=0)
    hit = (seen != 0) | (c > 0)
    x = tl.where(hit, tl.where(x > 0, tl.div_rn(x, rep), x * rep), x)
    cf = c.to(tl.float32)
    x = x - (freq * cf + pres * (c > 0).to(tl.float32))
    tl.store(logits_ptr + row * logits_stride + offs, x, mask=m)


def apply_penalties_triton(
    logits: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor,
    rep: torch.Tensor,
    freq: torch.Tensor,
    pres: torch.Tensor,
    add: torch.Tensor,
    flight: torch.Tensor | None = None,
    flight_rows: torch.Tensor | None = None,
) -> None:
    """logits [N, V] float32 in place: rows[i] penalised with counts[slots[i]] and
    prompt_seen[slots[i]] (int32 and bool [S, V]) and the factors rep/freq/pres[i], after
    adding one output token to counts[slots[i]]: flight[flight_rows[i]] where flight_rows[i]
    >= 0 (the in-flight step's tokens, on the device), else add[i] (int64; -1: none)."""
    n, vocab = rows.shape[0], logits.shape[-1]
    if n == 0:
        return
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1 and counts.stride() == prompt_seen.stride()
    has_flight = flight is not None and flight_rows is not None
    grid = (n, triton.cdiv(vocab, BLOCK))
    _penalties_kernel[grid](
        logits, logits.stride(0), rows, slots, counts, prompt_seen.view(torch.uint8), counts.stride(0),
        rep, freq, pres, add, flight if has_flight else add, flight_rows if has_flight else add, vocab,
        BLOCK=BLOCK, HAS_FLIGHT=has_flight,
    )
