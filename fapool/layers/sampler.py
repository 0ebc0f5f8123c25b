"""Turns logits into tokens: greedy, or temperature / top-k / top-p / min-p sampling with an
optional per-request generator, plus logprobs.

Rows of a batch carry different parameters, so filtering is vectorised where parameters
allow and each row draws from its own generator (per-request reproducibility).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.outputs import Logprob
from fapool.sampling_params import SamplingParams


@dataclass
class SampleRow:
    row: int  # index into the logits batch
    params: SamplingParams
    generator: torch.Generator | None


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] of temperature-scaled logits with top-k, top-p and min-p applied (-inf)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, rows: list[SampleRow], default_generator: torch.Generator | None = None
) -> tuple[list[int], list[list[Logprob] | None]]:
    """logits [N, V] float32 (any device). Returns one token per SampleRow and, where asked,
    the chosen token's logprob followed by the top-`logprobs` alternatives (from the raw
    distribution, as vLLM reports them)."""
    logits = logits.float()
    tokens: list[int] = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        idx = torch.tensor([rows[i].row for i in greedy], device=logits.device)
        chosen = logits[idx].argmax(dim=-1).tolist()
        for i, t in zip(greedy, chosen):
            tokens[i] = t
    for i, r in enumerate(rows):
        if r.params.greedy:
            continue
        probs = torch.softmax(_filter_logits(logits[r.row], r.params), dim=-1).cpu()
        gen = r.generator or default_generator
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())

    logprobs: list[list[Logprob] | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[[rows[i].row for i in want]], dim=-1).cpu()
        for j, i in enumerate(want):
            entry = [Logprob(tokens[i], float(lp[j, tokens[i]]))]
            k = rows[i].params.logprobs or 0
            if k:
                vals, ids = torch.topk(lp[j], k)
                entry += [Logprob(int(t), float(v)) for t, v in zip(ids, vals)]
            logprobs[i] = entry
    return tokens, logprobs
