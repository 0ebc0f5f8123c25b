"""The sampler's inputs: a step's per-row sampling parameters as device tensors, and the hash
multipliers the torch sampler (fapool.layers.sampler) and the Triton one share."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fapool.sampling_params import GREEDY, SamplingParams

# Two odd multipliers below 2**31, so a 32-bit value times either fits an int64 (torch has
# no uint32 arithmetic); the Triton kernel computes the same in uint32.
MUL_A, MUL_B = 0x7FEB352D, 0x1B873593


class Mode(enum.IntEnum):
    """What a step's sampling needs, decided on the host (the torch sampler sorts only for SORT)."""

    GREEDY = 0  # every row greedy: argmax
    SAMPLE = 1  # some row samples; no row has top-k or top-p: no sort
    SORT = 2  # some sampled row has top-k or top-p


@dataclass
class SamplingBatch:
    """The sampling parameters of a step's due rows, on the device. `ints` [3, N] int64: top-k
    (the vocab size when off), seed, output index (the hash's counter); `floats` [3, N] float32:
    temperature (0: greedy), top-p, min-p."""

    ints: torch.Tensor
    floats: torch.Tensor
    mode: Mode
    logprobs: int | None  # the most top alternatives a row asks for; None: no row asks

    TOP_K, SEED, COUNTER = range(3)
    TEMPERATURE, TOP_P, MIN_P = range(3)

    @classmethod
    def fill_host(
        cls,
        rows: list[tuple[SamplingParams, int, int] | None], vocab_size: int, ints: torch.Tensor, floats: torch.Tensor
    ) -> tuple[Mode, int | None]:
        """Write rows (params, seed, output index; None: a row whose token is not used, drawn
        greedily) into the first columns of host tensors laid out as `ints` and `floats`;
        returns the step's mode and logprobs count."""
        n = len(rows)
        params = [GREEDY if r is None else r[0] for r in rows]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        iv, fv = ints.numpy(), floats.numpy()
        iv[cls.TOP_K, :n] = top_k
        iv[cls.SEED, :n] = [0 if r is None else r[1] for r in rows]
        iv[cls.COUNTER, :n] = [0 if r is None else r[2] for r in rows]
        fv[cls.TEMPERATURE, :n] = [p.temperature for p in params]
        fv[cls.TOP_P, :n] = [p.top_p for p in params]
        fv[cls.MIN_P, :n] = [p.min_p for p in params]
        sampled = [(p, k) for p, k in zip(params, top_k) if not p.greedy]
        mode = Mode.GREEDY
        if sampled:
            mode = Mode.SORT if any(k < vocab_size or p.top_p < 1.0 for p, k in sampled) else Mode.SAMPLE
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return mode, (max(asked) if asked else None)

    @classmethod
    def build(
        cls, rows: list[tuple[SamplingParams, int, int]], vocab_size: int, device: torch.device | str
    ) -> SamplingBatch:
        device = torch.device(device)
        pin = device.type == "cuda"
        ints = torch.empty((3, len(rows)), dtype=torch.int64, pin_memory=pin)
        floats = torch.empty((3, len(rows)), dtype=torch.float32, pin_memory=pin)
        mode, logprobs = cls.fill_host(rows, vocab_size, ints, floats)
        return cls(ints.to(device, non_blocking=True), floats.to(device, non_blocking=True), mode, logprobs)
