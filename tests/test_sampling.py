"""SamplingParams validation and the device sampler (fapool.layers.sampler): its filters, its
distribution against a reference sampler, per-request seeds, logprobs."""

import math

import pytest
import torch
from gpu_marks import needs_cuda

from fapool.layers.row_reduce import row_argmax, row_topk_indices
from fapool.layers.sampler import (
    compute_logprobs,
    logprob_lists,
    request_seed,
    sample_tokens,
    uniforms,
)
from fapool.layers.sampling_batch import Mode, SamplingBatch
from fapool.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("max_tokens", 0),
        ("logprobs", 50),
        ("seed", "x"),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_stop_accepts_a_string():
    assert SamplingParams(stop="END").stop == ("END",)


def _draw(logits: torch.Tensor, params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """n draws of one row's token, one per output index (the hash's counter)."""
    rows = [(params, seed, i) for i in range(n)]
    return sample_tokens(logits.expand(n, -1), SamplingBatch.build(rows, logits.shape[-1], "cpu"))


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the filters define, computed plainly: softmax(x / T), then top-k
    (ties at the k-th kept), min-p, and top-p (the smallest prefix by probability reaching
    top_p, ties at its last kept)."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k > 0:
        keep &= probs >= probs.sort(descending=True).values[p.top_k - 1]
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    if p.top_p < 1:
        kept = torch.where(keep, probs, 0.0)
        kept = kept / kept.sum()
        order = kept.sort(descending=True).values
        before = order.cumsum(0) - order
        last = order[(before < p.top_p).sum() - 1]
        keep &= kept >= last
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


LOGITS = torch.tensor([2.0, 1.9, 1.0, 0.0, -1.0, 0.5, -3.0, 1.2])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.2),
        SamplingParams(temperature=1.1, top_k=5, top_p=0.9, min_p=0.05),
    ],
    ids=["t1", "t0.7", "topk", "topp", "minp", "all"],
)
def test_draws_follow_the_reference_distribution(params):
    """Chi-square goodness of fit of 4000 draws (fixed seed) against reference_probs; tokens
    the reference drops are never drawn."""
    n = 4000
    want = reference_probs(LOGITS, params)
    counts = torch.bincount(_draw(LOGITS[None], params, n), minlength=len(LOGITS)).double()
    assert counts[want == 0].sum() == 0
    kept = want > 0
    expected = want[kept].double() * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # The 0.999 quantile of chi-square(dof) is below dof + 4.5 sqrt(2 dof) + 8 for these dofs.
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof) + 8, (chi2, dof)


def test_filters_restrict_the_support():
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.0, -1.0]])

    def support(**kw) -> set[int]:
        return set(_draw(logits, SamplingParams(**kw), 300).tolist())

    assert support(temperature=0.0) == {0}
    assert support(temperature=1.0, top_k=1) == {0}
    assert support(temperature=1.0, top_k=2) == {0, 1}
    # p(0) ~ 0.40, p(1) ~ 0.36: top_p 0.5 keeps the first two.
    assert support(temperature=1.0, top_p=0.5) == {0, 1}
    assert support(temperature=1.0, top_p=0.3) == {0}
    # A top_p so small it underflows any sum still keeps the top token (no error, no garbage).
    assert support(temperature=1.0, top_p=1e-46) == {0}
    # min_p 0.5 keeps tokens with p >= 0.5 * p_max: exp(-1) = 0.37 -> drops index 2 and below.
    assert support(temperature=1.0, min_p=0.5) == {0, 1}
    assert support(temperature=1.0) == {0, 1, 2, 3, 4}


def test_a_seeded_request_draws_the_same_alone_and_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    seed = request_seed(7, 0)
    alone = sample_tokens(logits[2:3], SamplingBatch.build([(p, seed, 11)], 100, "cpu"))
    others = [(SamplingParams(temperature=0.5, top_k=4), request_seed(i, 0), 3) for i in range(4)]
    rows = others[:2] + [(p, seed, 11)] + others[2:]
    mixed = sample_tokens(logits, SamplingBatch.build(rows, 100, "cpu"))
    assert mixed[2] == alone[0]
    # Another counter (the next token) or another sibling index draws independently.
    draws = {
        int(sample_tokens(logits[2:3], SamplingBatch.build([(p, s, c)], 100, "cpu"))[0])
        for s, c in [(seed, 11), (seed, 12), (request_seed(7, 1), 11), (seed, 13), (seed, 14)]
    }
    assert len(draws) > 1


def test_greedy_rows_take_the_argmax_and_the_mode_follows_the_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0.0)
    rows = [(greedy, 1, 0), (SamplingParams(temperature=1.0), 2, 0), (greedy, 3, 0)]
    batch = SamplingBatch.build(rows, 50, "cpu")
    assert batch.mode == Mode.SAMPLE and batch.logprobs is None
    tokens = sample_tokens(logits, batch)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert SamplingBatch.build(rows[:1], 50, "cpu").mode == Mode.GREEDY
    assert SamplingBatch.build([(SamplingParams(top_p=0.9), 1, 0)], 50, "cpu").mode == Mode.SORT
    assert SamplingBatch.build([(SamplingParams(top_k=50), 1, 0)], 50, "cpu").mode == Mode.SAMPLE  # k >= V: off


@pytest.mark.parametrize("vocab", [1000, 1024, 1025, 49152, 50257])
def test_row_argmax_is_torch_argmax_with_ties_nans_and_a_short_last_chunk(vocab):
    """The chunked argmax gives aten's index: the first maximum (ties across and within chunks,
    in the short last chunk too), the first NaN, and 0 for a row of -inf."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 7, (12, vocab), generator=g).float()  # many ties
    x[1] = torch.randn(vocab, generator=g)
    x[2, -1] = 99.0  # the very last column
    x[3, vocab - 2], x[3, vocab // 2] = float("nan"), float("nan")
    x[4, -1] = float("nan")
    x[5] = float("-inf")
    x[6, :] = 3.0
    x[7, 5] = float("inf")
    x[7, vocab - 3] = float("inf")
    torch.testing.assert_close(row_argmax(x), x.argmax(dim=-1), rtol=0, atol=0)
    strided = x.t().contiguous().t()  # not contiguous: aten's argmax itself
    torch.testing.assert_close(row_argmax(strided), x.argmax(dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [1024, 5000, 49152])
def test_row_topk_indices_are_a_top_k(vocab):
    """The chunked top-k returns k distinct columns whose values are the row's k largest (ties
    may pick other columns of an equal value), the short last chunk's clamped columns once."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 50, (6, vocab), generator=g).float()  # ties
    x[1] = torch.randn(vocab, generator=g)
    x[2, -3:] = 100.0  # the top in the short last chunk
    x[3, :] = 1.0
    got = row_topk_indices(x, 16)
    assert got.shape == (6, 16)
    for r in range(6):
        assert got[r].unique().numel() == 16
        torch.testing.assert_close(x[r, got[r]].sort().values, x[r].topk(16).values.sort().values, rtol=0, atol=0)


def test_a_row_with_nan_logits_fails_alone():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 4] = float("nan")
    rows = [(SamplingParams(temperature=t), 5, 0) for t in (0.0, 1.0, 1.0)]
    tokens = sample_tokens(logits, SamplingBatch.build(rows, 20, "cpu"))
    assert tokens[1] == -1 and tokens[0] >= 0 and tokens[2] >= 0
    logits[0, 19] = float("nan")  # a greedy batch too, the NaN in the last column
    tokens = sample_tokens(logits, SamplingBatch.build([(SamplingParams(temperature=0.0), 5, 0)] * 3, 20, "cpu"))
    assert tokens.tolist() == [-1, -1, int(logits[2].argmax())]


def test_uniforms_are_uniform_and_distinct_per_key():
    keys = torch.tensor([1, 2], dtype=torch.int64), torch.tensor([3, 3], dtype=torch.int64)
    u = uniforms(*keys, 100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert float((u[0] - u[1]).abs().mean()) > 0.3  # not the same stream


def test_logprobs_are_the_log_softmax():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([4, 7])
    lps = compute_logprobs(logits, tokens, 3)
    want = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(lps.chosen, want[[0, 1], [4, 7]])
    entries = logprob_lists([4, 7], lps, [3, None])
    assert entries[1] is None and len(entries[0]) == 4
    top = want[0].topk(3)
    assert [e.token_id for e in entries[0][1:]] == top.indices.tolist()
    assert entries[0][0].logprob == pytest.approx(float(want[0, 4]))


@needs_cuda
@pytest.mark.parametrize("vocab", [1000, 32000, 151936])
def test_triton_sampler_equals_the_torch_reference(vocab):
    """The one-launch kernel (radix top-k, top-p by rejection) against sample_tokens_torch
    (thresholds by a sort) on the same logits and rows, every filter mixed: the same tokens
    (exp / log differ in their last bits and sums in their order, so a near-tie may differ:
    allow one row in a hundred)."""
    from fapool.layers.sampler import sample_tokens_torch
    from fapool.layers.triton_sampler import sample_triton

    n = 256
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(n, vocab, generator=g) * 3
    x[5, 17] = float("nan")
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=0.7, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=200, top_p=0.5, min_p=0.01),
        SamplingParams(temperature=2.0, top_p=0.2),
        SamplingParams(temperature=1.0, top_p=1e-46),  # underflows: the top token
    ]
    rows = [(choices[i % len(choices)], request_seed(i, 0), i) for i in range(n)]
    batch = SamplingBatch.build(rows, vocab, "cuda")
    got = sample_triton(x.cuda(), batch).cpu()
    want = sample_tokens_torch(x.cuda(), batch).cpu()
    assert got[5] == want[5] == -1
    assert (got != want).sum() <= n // 100, (got != want).nonzero().flatten().tolist()
    cpu = sample_tokens_torch(x, SamplingBatch.build(rows, vocab, "cpu"))
    assert (cpu != want).sum() <= n // 100


@needs_cuda
@pytest.mark.parametrize("vocab", [1000, 32000, 151936])
def test_triton_sampler_chunks_equal_one_program_a_row(vocab):
    """A row's first passes split over chunk programs (what a small batch gets) give the tokens
    of one program a row: the same maxima, argmaxes and draw winners; only the top-p mass is
    summed in another order (allow one row in a hundred)."""
    from fapool.layers.triton_sampler import chunks_per_row, sample_triton

    assert chunks_per_row(8, 32000, torch.device("cuda")) > 1
    n = 256
    g = torch.Generator().manual_seed(vocab + 1)
    x = (torch.randn(n, vocab, generator=g) * 3).cuda()
    x[7, 3] = float("nan")
    x[9, : vocab // 2] = float("-inf")  # whole chunks masked out
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, top_p=0.2),
        SamplingParams(temperature=0.7, min_p=0.1, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=40),
    ]
    rows = [(choices[i % len(choices)], request_seed(i, 0), i) for i in range(n)]
    batch = SamplingBatch.build(rows, vocab, "cuda")
    whole = sample_triton(x, batch, num_chunks=1).cpu()
    for chunks in (2, 7, 16):
        got = sample_triton(x, batch, num_chunks=chunks).cpu()
        assert got[7] == whole[7] == -1
        greedy = torch.arange(n) % len(choices) == 0
        assert torch.equal(got[greedy], whole[greedy])
        assert (got != whole).sum() <= n // 100, (chunks, (got != whole).nonzero().flatten().tolist())
