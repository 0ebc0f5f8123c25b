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
        seeds, counters = [0] * n, [0] * n
        # Runs of rows sharing one params object (a batch of one SamplingParams, then the
        # padding): each run's parameter values are written as one slice.
        runs: list[tuple[int, SamplingParams]] = []
        last = None
        for i, r in enumerate(rows):
            if r is None:
                p = GREEDY
            else:
                p, seeds[i], counters[i] = r
            if p is not last:
                runs.append((i, p))
                last = p
        iv, fv = ints.numpy(), floats.numpy()
        iv[cls.SEED, :n] = seeds
        iv[cls.COUNTER, :n] = counters
        mode = Mode.GREEDY
        asked = None
        distinct: dict[int, SamplingParams] = {}
        for j, (start, p) in enumerate(runs):
            end = runs[j + 1][0] if j + 1 < len(runs) else n
            top_k = p.top_k if 0 < p.top_k < vocab_size else vocab_size
            iv[cls.TOP_K, start:end] = top_k
            fv[cls.TEMPERATURE, start:end] = p.temperature
            fv[cls.TOP_P, start:end] = p.top_p
            fv[cls.MIN_P, start:end] = p.min_p
            if id(p) in distinct:
                continue
            distinct[id(p)] = p
            if not p.greedy:
                if top_k < vocab_size or p.top_p < 1.0:
                    mode = Mode.SORT
                elif mode is Mode.GREEDY:
                    mode = Mode.SAMPLE
            if p.logprobs is not None:
                asked = p.logprobs if asked is None else max(asked, p.logprobs)
        return mode, asked

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
