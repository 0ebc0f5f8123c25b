"""Turns a batch's logits into tokens on the device, without a host sync: greedy, temperature,
top-k, top-p and min-p, each row with its own seed; plus logprobs.

Every filter is a per-row logit threshold (a token is kept when its logit reaches it):

    min-p   p_i >= min_p * p_max          <=>  x_i >= x_max + T * log(min_p)
    top-k   the k-th largest logit (ties at it are kept)
    top-p   over the tokens the two above keep, sorted by logit: the smallest prefix whose
            mass reaches top_p, widened to every token tied with its last (at least the top one)

and the draw is Gumbel-max: argmax_i (x_i / T + g_i), g_i = -log(-log u_i), picks token i with
probability softmax(x / T) restricted to the kept tokens. The uniforms come from a counter-based
hash of (request seed, output index, vocab index) instead of a stateful generator: a seeded
request draws the same tokens whatever batch it shares, in eager steps or in CUDA graphs, and
a request recomputed after preemption draws its tokens again. On CUDA one Triton launch does it
all (fapool.layers.triton_sampler: no sort, top-p by rejection); the torch code here, which
sorts only when a row asks for top-k or top-p, is the CPU path and the kernel's reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.layers.row_reduce import row_argmax
from fapool.layers.sampling_batch import MUL_A, MUL_B, Mode, SamplingBatch
from fapool.outputs import Logprob

MASK32 = 0xFFFFFFFF
SEED_BITS = 63


def request_seed(base: int, index: int) -> int:
    """A request's sampling seed from its group's seed and its index among n siblings: sibling
    i of a group seeded s draws as a lone request seeded s + i (splitmix64 of the sum)."""
    z = (base + index + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> (64 - SEED_BITS)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit keys per row from its seed and counter (int64 [N] each)."""
    lo, hi, c = seed & MASK32, (seed >> 32) & MASK32, counter & MASK32
    a = _mix32(_mix32(c ^ lo) ^ hi)
    b = _mix32(_mix32(((c + 0x9E3779B9) & MASK32) ^ hi) ^ lo ^ 0x85EBCA6B)
    return a, b


def uniforms(key_a: torch.Tensor, key_b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] float32 uniforms in (0, 1), 24 bits each, of every row's keys and vocab index."""
    idx = torch.arange(vocab_size, device=key_a.device, dtype=torch.int64)
    h = _mix32(_mix32(idx[None, :] ^ key_a[:, None]) ^ key_b[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def thresholds(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[N] float32: the lowest logit each row keeps after min-p, top-k and top-p."""
    f, i = batch.floats, batch.ints
    temp, top_p, min_p = f[batch.TEMPERATURE], f[batch.TOP_P], f[batch.MIN_P]
    x_max = x.max(dim=-1).values
    thr = torch.where(min_p > 0, x_max + temp * torch.log(min_p.clamp(min=1e-30)), float("-inf"))
    if batch.mode != Mode.SORT:
        return thr
    s = x.sort(dim=-1, descending=True).values
    k = i[batch.TOP_K].clamp(1, x.shape[-1])
    thr = torch.maximum(thr, s.gather(1, (k - 1)[:, None])[:, 0])
    # top-p over the kept tokens: probabilities relative to the largest (it is kept).
    inv_t = torch.where(temp > 0, 1.0 / temp.clamp(min=1e-30), 1.0)
    e = torch.where(s >= thr[:, None], torch.exp((s - x_max[:, None]) * inv_t[:, None]), 0.0)
    cum = e.cumsum(dim=-1)
    count = ((cum - e) < top_p[:, None] * cum[:, -1:]).sum(dim=-1).clamp(min=1)
    top_p_thr = s.gather(1, (count - 1)[:, None])[:, 0]
    return torch.where(top_p < 1.0, torch.maximum(thr, top_p_thr), thr)


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [N, V] -> tokens [N] int64 on the same device, -1 for a row with a NaN logit.
    No host sync: safe inside a CUDA graph. On CUDA one Triton launch (whatever the mode)."""
    x = logits.float()
    if x.is_cuda:
        from fapool.layers.triton_sampler import sample_triton

        return sample_triton(x, batch)
    return sample_tokens_torch(x, batch)


def sample_tokens_torch(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The torch sampler (CPU, and the Triton kernel's reference): thresholds by a sort."""
    greedy = row_argmax(x)
    # argmax takes a NaN for the maximum, so a row holds a NaN iff its argmax is one.
    has_nan = torch.isnan(x.gather(-1, greedy[:, None]))[:, 0]
    if batch.mode != Mode.GREEDY:
        temp = batch.floats[batch.TEMPERATURE]
        inv_t = torch.where(temp > 0, 1.0 / temp.clamp(min=1e-30), 1.0)
        thr = thresholds(x, batch)
        key_a, key_b = row_keys(batch.ints[batch.SEED], batch.ints[batch.COUNTER])
        g = -torch.log(-torch.log(uniforms(key_a, key_b, x.shape[-1])))
        score = torch.where(x >= thr[:, None], x * inv_t[:, None] + g, float("-inf"))
        greedy = torch.where(temp > 0, row_argmax(score), greedy)
    return torch.where(has_nan, -1, greedy)


@dataclass
class DeviceLogprobs:
    """Logprobs of a step's rows (raw distribution, as vLLM reports them), on the device."""

    chosen: torch.Tensor  # [N] the sampled token's
    top_values: torch.Tensor  # [N, K]
    top_ids: torch.Tensor  # [N, K]


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> DeviceLogprobs:
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
    top = lp.topk(k, dim=-1) if k else None
    empty = lp[:, :0]
    return DeviceLogprobs(
        chosen,
        top.values if top is not None else empty,
        top.indices if top is not None else empty.long(),
    )


def logprob_lists(
    tokens: list[int], lps: DeviceLogprobs | None, asked: list[int | None]
) -> list[list[Logprob] | None]:
    """Per row: the chosen token's logprob, then its `asked` top alternatives (None: not asked).
    `lps` already on the host."""
    out: list[list[Logprob] | None] = []
    for j, (tok, k) in enumerate(zip(tokens, asked)):
        if k is None or lps is None or tok < 0:
            out.append(None)
            continue
        entry = [Logprob(tok, float(lps.chosen[j]))]
        entry += [Logprob(int(t), float(v)) for t, v in zip(lps.top_ids[j, :k], lps.top_values[j, :k])]
        out.append(entry)
    return out
