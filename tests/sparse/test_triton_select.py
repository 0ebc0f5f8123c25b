"""Triton block selection (fapool.sparse.triton_select) against the torch reference, and the
selection + sparse decode kernels against SparseAttentionBackend.sparse_decode.

Runs on a CUDA GPU, or on CPU through Triton's interpreter with TRITON_INTERPRET=1 (slow, but
these shapes are small); skipped otherwise. Integer-valued keys and queries make every block
score exact whatever the summation order, so the selections must agree exactly, ties included
(there are many: small integers collide often).
"""

import math

import pytest
import torch
from gpu_marks import HAVE_TRITON, INTERPRET, needs_triton

from fapool.attention import TorchReferenceBackend
from fapool.attention.sparse import SparseAttentionBackend
from fapool.sparse.selection import (
    MIN_GROWTH_PAST_LAST,
    BudgetRule,
    budget_blocks,
    budget_blocks_batched,
    compact_selection,
    select_blocks_torch,
)

CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="CUDA graphs need a CUDA GPU with triton")
# The interpreter computes through numpy, which has no bfloat16.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
BS = 16


def _case(n_kv, num_heads, num_kv_heads, head_dim, width, dtype, seed, integer=True):
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(n_kv)
    num_blocks = num_seqs * width + 3
    if integer:  # exact scores: |q . k| <= 2 * 3 * head_dim, representable in every dtype
        keys = torch.randint(-3, 4, (num_blocks, BS, num_kv_heads, head_dim), generator=g).float()
        q = torch.randint(-2, 3, (num_seqs, num_heads, head_dim), generator=g).float()
    else:
        keys = torch.randn(num_blocks, BS, num_kv_heads, head_dim, generator=g)
        q = torch.randn(num_seqs, num_heads, head_dim, generator=g)
    values = torch.randn(num_blocks, BS, num_kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: num_seqs * width].view(num_seqs, width).int()
    to = dict(device=DEVICE, dtype=dtype)
    keys, values, q = keys.to(**to), values.to(**to), q.to(**to)
    n_kv = torch.tensor(n_kv, device=DEVICE).int()
    return q, keys, values, keys.amin(1), keys.amax(1), tables.to(DEVICE), n_kv


SEARCHES = {"sort": 1 << 30, "1bit": 0}  # SORT_MAX_ROW


def _use_search(monkeypatch, search: str) -> None:
    """Stage 2's threshold search: one sort, or one bit a pass (each on every row)."""
    from fapool.sparse import triton_select

    monkeypatch.setattr(triton_select, "SORT_MAX_ROW", SEARCHES[search])


@needs_triton
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_equals_reference_exactly(dtype, search, monkeypatch):
    from fapool.sparse.triton_select import select_blocks_triton

    _use_search(monkeypatch, search)

    # Rows: empty, one entry, one full block, partial, exactly full, long; budgets 0..beyond nb.
    n_kv = [0, 1, 16, 37, 160, 700, 703]
    width = 48
    q, _, _, kmin, kmax, tables, nk = _case(n_kv, 8, 2, 16, width, dtype, seed=1)
    budgets = torch.tensor([[3, 0], [1, 2], [1, 2], [1, 2], [4, 10], [5, 48], [13, 2]], device=DEVICE).int()
    for max_pages in (width, 20):
        pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, budgets, BS, max_pages)
        ref_pages, ref_lens = select_blocks_torch(q, kmin, kmax, tables, nk, budgets, BS, max_pages)
        assert torch.equal(pages.cpu(), ref_pages.cpu()) and torch.equal(lens.cpu(), ref_lens.cpu())
    # k = 1 keeps only the sink (a full block), k = 2 adds the recent (partial) block.
    assert lens[3].tolist() == [16, 16 + 5]
    assert lens[0].tolist() == [0, 0] and pages[0].abs().sum() == 0


@needs_triton
def test_page_tables_give_the_chosen_block_indices():
    """Summaries read at one table, pages from another: with block index + 1 there (as the
    pool's driver, whose summary rows are not pages) the pages are select_block_indices' blocks."""
    from fapool.sparse.selection import select_block_indices
    from fapool.sparse.triton_select import block_scores_triton, select_blocks_triton

    n_kv = [1, 37, 160, 700]
    width, k = 48, 6
    q, _, _, kmin, kmax, tables, nk = _case(n_kv, 8, 2, 16, width, torch.float32, seed=5)
    budgets = torch.full((len(n_kv), 2), k, device=DEVICE).int()
    order = torch.arange(1, width + 1, dtype=torch.int32, device=DEVICE).repeat(len(n_kv), 1)
    pages, _ = select_blocks_triton(q, kmin, kmax, tables, nk, budgets, BS, k, page_tables=order)
    score = block_scores_triton(q, kmin, kmax, tables, nk, BS)
    nb = (nk.long() + BS - 1) // BS
    score = torch.where(torch.arange(width, device=DEVICE) < nb.view(-1, 1, 1), score, float("-inf"))
    want = select_block_indices(score, nb, budgets, k)
    got = torch.where(pages > 0, pages.long() - 1, width)
    assert torch.equal(got.cpu(), want.cpu())


@needs_triton
@pytest.mark.parametrize("search", list(SEARCHES))
def test_ties_and_signed_zero_follow_the_rule(search, monkeypatch):
    """Scores that all tie (zero queries: every bound is +0.0 or -0.0): the others are taken in
    ascending block index, after the sink and the recent block."""
    from fapool.sparse.triton_select import select_blocks_triton

    _use_search(monkeypatch, search)
    q, _, _, kmin, kmax, tables, nk = _case([20 * BS + 3], 4, 1, 16, 24, torch.float32, seed=2)
    q = torch.zeros_like(q)
    q[..., 0] = -0.0
    budgets = torch.tensor([[6]], device=DEVICE).int()
    pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, budgets, BS)
    blocks = [1, 2, 3, 4]  # the 4 best others: all tied, lowest index first
    want = tables[0, [0, *blocks, 20]].cpu()
    assert torch.equal(pages[0, 0, :6].cpu(), want) and int(lens[0, 0]) == 5 * BS + 3


def _kernel_budgets_match(budget, n_kv: list[int], seed: int) -> None:
    """The selection kernel turns `budget` (fractions or a BudgetRule) into the same blocks as
    budget_blocks / budget_blocks_batched, and selects what the torch reference does with them."""
    from fapool.sparse.triton_select import select_blocks_triton

    q, _, _, kmin, kmax, tables, nk = _case(n_kv, 12, 4, 32, 48, torch.float16, seed=seed)
    pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, budget.to(DEVICE), BS, min_blocks=3)
    budgets = budget_blocks_batched(budget, torch.tensor(n_kv), BS, 3)
    for s, n in enumerate(n_kv):
        assert torch.equal(budgets[s], budget_blocks(budget, math.ceil(n / BS), 3))
    ref_pages, ref_lens = select_blocks_torch(q, kmin, kmax, tables, nk, budgets.to(DEVICE), BS)
    assert torch.equal(pages.cpu(), ref_pages.cpu()) and torch.equal(lens.cpu(), ref_lens.cpu())


@needs_triton
@pytest.mark.parametrize("seed", [3, 4])
def test_fraction_budgets_match_budget_blocks(seed):
    # 0.1 * 20 and 0.3 * 10 sit on integers after rounding: the 1e-6 guard must act the same.
    frac = torch.tensor([0.1, 0.3, 1 / 3, 0.95], dtype=torch.float64)
    _kernel_budgets_match(frac, [1, 17, 100, 160, 320, 497, 640, 767], seed)


@needs_triton
def test_rule_budgets_in_the_kernel_match_budget_blocks():
    """A length rule (knots at 10 and 30 blocks, head 1's blocks held flat between them by the
    non-decreasing rule) is evaluated in the kernel exactly as budget_blocks(rule) does, on
    rows below, between and past the knots."""
    rule = BudgetRule.from_knots([[0.5, 0.3, 1 / 3, 0.9], [0.2, 0.1, 0.3, 0.6]], [10.0, 30.0])
    _kernel_budgets_match(rule, [1, 17, 100, 160, 161, 320, 481, 767], 9)


def test_budget_rule_through_its_knots():
    # Head 0: 0.5 at 64 blocks (32), 0.25 at 256 (64): interpolated, then slope 1/6 beyond.
    # Head 1: 0.5 at 64 (32), 0.1 at 256 (25.6 -> held at 32: never fewer blocks when longer);
    # past 256 it still grows, at MIN_GROWTH_PAST_LAST x its share there (32 / 256).
    rule = BudgetRule.from_knots([[0.5, 0.5], [0.25, 0.1]], [64.0, 256.0])
    raw = lambda nb: rule.raw(torch.tensor(float(nb))).tolist()  # noqa: E731
    assert raw(32) == [16.0, 16.0]  # below the first knot: its fraction
    assert raw(64) == [32.0, 32.0] and raw(256) == [64.0, 32.0]
    assert raw(160) == pytest.approx([48.0, 32.0])
    assert raw(512) == pytest.approx([64.0 + 256 / 6, 32.0 + 256 * MIN_GROWTH_PAST_LAST * 32 / 256])
    ks = [budget_blocks(rule, nb, 4) for nb in range(1, 700)]
    assert all(bool((b >= a).all()) for a, b in zip(ks, ks[1:]))  # monotone in the length
    one = BudgetRule.from_knots([[0.3, 0.7]], [100.0])  # one knot: the plain fraction rule
    for nb in range(1, 300):
        assert torch.equal(
            budget_blocks(one, nb, 4), budget_blocks(torch.tensor([0.3, 0.7], dtype=torch.float64), nb, 4)
        )
    with pytest.raises(ValueError, match="ascending"):
        BudgetRule.from_knots([[0.5], [0.4]], [64.0, 64.0])
    with pytest.raises(ValueError, match="one row of head fractions per knot"):
        BudgetRule.from_knots([[0.5, 0.4]], [64.0, 128.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        BudgetRule.from_knots([[0.5], [1.5]], [64.0, 128.0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_select_and_decode_match_the_reference_backend(dtype):
    """Random data: the kernels' output equals the torch sparse path on the same budgets."""
    from fapool.sparse.triton_balanced_decode import balanced_sparse_decode
    from fapool.sparse.triton_select import select_blocks_triton

    n_kv = [300, 1000, 65, 999]
    q, keys, values, kmin, kmax, tables, nk = _case(n_kv, 8, 2, 64, 64, dtype, seed=5, integer=False)
    frac = torch.tensor([0.1, 0.4], dtype=torch.float64)
    budgets = budget_blocks_batched(frac, nk.cpu(), BS, 4).to(DEVICE)
    pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, budgets, BS, max_pages=int(budgets.max()))
    out, lse = balanced_sparse_decode(q, keys, values, pages, lens, 64**-0.5)
    ref = SparseAttentionBackend(TorchReferenceBackend(), frac.tolist())
    ref.kmin, ref.kmax = kmin, kmax
    ref_out, ref_lse = ref.sparse_decode(q, keys, values, tables, nk, budgets, 64**-0.5)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.float().cpu(), ref_out.cpu(), **tol)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), **tol)


@needs_cuda
def test_select_and_decode_replay_in_a_cuda_graph():
    """Captured once, replayed after q, n_kv and the tables change in place: same as eager
    (the balanced kernel's plan follows the new lengths inside the graph)."""
    from fapool.sparse.triton_balanced_decode import balanced_sparse_decode
    from fapool.sparse.triton_select import select_blocks_triton

    q, keys, values, kmin, kmax, tables, nk = _case([900, 500], 32, 8, 128, 64, torch.bfloat16, 6, False)
    frac = torch.linspace(0.1, 0.6, 8, dtype=torch.float64, device=DEVICE)

    def step():
        pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, frac, BS, max_pages=40)
        return balanced_sparse_decode(q, keys, values, pages, lens, 128**-0.5)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    q.copy_(torch.randn_like(q))
    nk.copy_(torch.tensor([1000, 17], device=DEVICE))
    tables.copy_(tables.flip(1))
    graph.replay()
    want_out, want_lse = step()
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_compact_selection_layout():
    """Pure torch (always runs): ascending blocks, zero padding, lens with the partial tail."""
    score = torch.tensor([[[0.0, 5.0, 1.0, 7.0, 2.0, 9.0]]])
    tables = torch.tensor([[10, 11, 12, 13, 14, 15]], dtype=torch.int32)
    pages, lens = compact_selection(score, torch.tensor([4 * BS + 2]), torch.tensor([[3]]), tables, BS, 4)
    # visible blocks 0..4: sink 0, recent 4, best other 3 (score 7; block 5 is invisible)
    assert pages.tolist() == [[[10, 13, 14, 0]]] and lens.tolist() == [[2 * BS + 2]]
    pages, lens = compact_selection(score, torch.tensor([4 * BS + 2]), torch.tensor([[1]]), tables, BS, 4)
    assert pages.tolist() == [[[10, 0, 0, 0]]] and lens.tolist() == [[BS]]


def test_block_order_puts_sink_and_recent_first_even_against_inf():
    from fapool.sparse.selection import block_order

    score = torch.tensor([[[1.0, float("inf"), 3.0, 3.0, -0.0, 0.0, 2.0]]])
    assert block_order(score, torch.tensor([6]))[0, 0].tolist() == [0, 5, 1, 2, 3, 4, 6]


def test_budget_blocks_batched_matches_budget_blocks():
    frac = torch.tensor([0.01, 0.1, 0.3, 1 / 3, 0.58, 1.0], dtype=torch.float64)
    n_kv = torch.arange(0, 3000, 7)
    got = budget_blocks_batched(frac, n_kv, BS, 4)
    for n, row in zip(n_kv.tolist(), got):
        assert torch.equal(row, budget_blocks(frac, math.ceil(n / BS), 4)), n


@needs_triton
@pytest.mark.parametrize("num_programs,block_n", [(None, 64), (7, 64), (64, 16)])
def test_balanced_decode_matches_the_reference_backend(num_programs, block_n):
    """Work-balanced decode (variable splits per pair, LSE-merged) on uneven selections: empty
    pairs, one-entry pairs, one pair far longer than the others. num_programs 7 (< pairs: one
    split each), 64 with 16-token tiles (the long pair gets more splits than one reduce step
    merges)."""
    from fapool.sparse.triton_balanced_decode import balanced_sparse_decode
    from fapool.sparse.triton_select import select_blocks_triton

    n_kv = [0, 1, 1000, 65, 999, 300]
    q, keys, values, kmin, kmax, tables, nk = _case(n_kv, 8, 2, 32, 64, torch.float16, seed=7, integer=False)
    budgets = torch.tensor([[4, 4], [4, 4], [62, 2], [3, 5], [1, 30], [19, 7]], device=DEVICE).int()
    pages, lens = select_blocks_triton(q, kmin, kmax, tables, nk, budgets, BS)
    out, lse = balanced_sparse_decode(q, keys, values, pages, lens, 32**-0.5, num_programs, block_n=block_n)
    ref = SparseAttentionBackend(TorchReferenceBackend(), [0.5, 0.5])
    ref.kmin, ref.kmax = kmin, kmax
    clipped = torch.minimum(budgets.cpu(), torch.tensor([-(-n // BS) for n in n_kv]).view(-1, 1))
    rows = [1, 2, 3, 4, 5]  # the reference needs a visible entry per row
    ref_out, ref_lse = ref.sparse_decode(
        q[rows], keys, values, tables[rows], nk[rows], clipped[rows].to(DEVICE), 32**-0.5
    )
    torch.testing.assert_close(out[rows].float().cpu(), ref_out.cpu(), atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(lse[rows].cpu(), ref_lse.cpu(), atol=4e-3, rtol=4e-3)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())  # an empty row


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["with_kv_write", "after_kv_write"])
def test_summaries_kernel_equals_the_reference_update(fused):
    """Steps of a prefill chunk, decode tokens, a -1 slot, a block reused from offset 0 and a
    step that ends mid-block: the Triton summaries (fused with the KV write, or after it) and
    the cache equal the torch write + update_summaries after every step."""
    from fapool.attention.torch_ref import write_kv_torch
    from fapool.sparse.triton_summaries import update_summaries_triton, write_kv_and_summaries

    g = torch.Generator().manual_seed(8)
    num_blocks, hkv, d = 6, 2, 32
    k_cache = torch.randn(num_blocks, BS, hkv, d, generator=g).to(DEVICE, torch.float16)
    v_cache = torch.randn(num_blocks, BS, hkv, d, generator=g).to(DEVICE, torch.float16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = SparseAttentionBackend(TorchReferenceBackend(), [0.5] * hkv)
    kmin = torch.zeros(num_blocks, hkv, d, device=DEVICE, dtype=torch.float16)
    kmax = torch.zeros_like(kmin)
    # As in the engine, a block's offsets before a step's first were written by earlier steps
    # (the fused write extends the summary; the cache's initial noise is never summarised).
    steps = [
        [*range(2 * BS, 2 * BS + 21), *range(4 * BS, 4 * BS + 3), *range(5 * BS, 5 * BS + 7)],  # chunks
        [2 * BS + 21, -1, 4 * BS + 3],  # decode; a padding row between
        [*range(5 * BS + 7, 6 * BS), 3 * BS],  # a chunk resumed mid-block to its last offset; another begins
        [2 * BS, 2 * BS + 1],  # block 2 reused from offset 0: its old keys must not count
        "cow",  # block 4 (offsets 0..3) copied on write to block 1, which is then written at offset 4
        [1 * BS + 4],
    ]
    for slots in steps:
        if slots == "cow":  # ModelRunner.copy_blocks: the KV, and the summaries with it
            for cache in (k_cache, v_cache, ref_k, ref_v):
                cache[1] = cache[4]
            kmin[1], kmax[1] = kmin[4], kmax[4]  # SparseAttentionBackend.copy_block_state
            continue
        slots = torch.tensor(slots, device=DEVICE)
        # float32 rows (the cache rounds them to float16, and so must the summaries)
        key = torch.randn(len(slots), hkv, d, generator=g).to(DEVICE) * 3
        value = torch.randn(len(slots), hkv, d, generator=g).to(DEVICE)
        write_kv_torch(ref_k, ref_v, key, value, slots)
        ref.update_summaries(ref_k, slots)
        if fused:
            write_kv_and_summaries(k_cache, v_cache, key, value, slots, kmin, kmax)
        else:
            write_kv_torch(k_cache, v_cache, key, value, slots)
            update_summaries_triton(k_cache, slots, kmin, kmax)
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
        touched = torch.unique(slots[slots >= 0] // BS)
        assert torch.equal(kmin[touched], ref.kmin[touched]) and torch.equal(kmax[touched], ref.kmax[touched])
    assert torch.equal(kmax[2], k_cache[2, :2].amax(0))


@needs_triton
def test_selection_clips_rows_causally():
    """query_pos_start / kv_start (an attention shard's metadata) clip the visible entries in
    the kernels: the same result as passing the clipped n_kv."""
    from fapool.sparse.triton_select import select_blocks_triton

    n_kv = [300, 500, 200, 64]
    q, _, _, kmin, kmax, tables, nk = _case(n_kv, 4, 2, 16, 40, torch.float32, seed=9)
    q_pos = torch.tensor([299, 250, 100, 10], device=DEVICE).int()
    kv0 = torch.tensor([0, 0, 150, 0], device=DEVICE).int()  # row 2 sees no entry
    frac = torch.tensor([0.3, 0.6], dtype=torch.float64, device=DEVICE)
    pages, lens = select_blocks_triton(
        q, kmin, kmax, tables, nk, frac, BS, query_pos_start=q_pos, kv_start=kv0
    )
    clipped = torch.tensor([300, 251, 0, 11], device=DEVICE).int()
    want_pages, want_lens = select_blocks_triton(q, kmin, kmax, tables, clipped, frac, BS)
    assert torch.equal(pages, want_pages) and torch.equal(lens, want_lens)
    assert lens[2].tolist() == [0, 0]


def _step_meta(specs, tables):
    """AttentionMetadata of a step: specs (context_len, query_len) per sequence."""
    from fapool.attention.metadata import AttentionMetadata

    slots = [t[i // BS] * BS + i % BS for t, (c, q) in zip(tables, specs) for i in range(c, c + q)]
    return AttentionMetadata.build(
        query_lens=[q for _, q in specs],
        query_pos_start=[c for c, _ in specs],
        kv_lens=[c + q for c, q in specs],
        block_tables=tables,
        slot_mapping=slots,
        device=DEVICE,
    )


@needs_triton
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed_batch", "decode_only"])
def test_triton_sparse_backend_matches_the_torch_path(mixed):
    """SparseAttentionBackend over the Triton backend (fused KV write + summaries, selection with
    the causal clip, balanced decode; a mixed batch's prefill rows dense) against the same
    wrapper over the torch reference: same caches and summaries, same attention."""
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = 8, 2, 32
    specs = [(300, 1), (37, 5), (500, 1), (0, 20), (130, 1)] if mixed else [(300, 1), (500, 1), (17, 1)]
    g = torch.Generator().manual_seed(10)
    total = sum(-(-(c + q) // BS) for c, q in specs) + 3
    perm = torch.randperm(total, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-(c + q) // BS))] for c, q in specs]
    budget = [0.3, 0.6]
    results = []
    for dense in (TorchReferenceBackend(), TritonBackend()):
        g.manual_seed(11)
        backend = SparseAttentionBackend(dense, budget)
        k_cache = torch.zeros(total, BS, num_kv_heads, head_dim, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        # The contexts in two earlier steps (prefill chunks), then this step's tokens.
        for lo, hi in ((0.0, 0.5), (0.5, 1.0)):
            prior = [(int(c * lo), int(c * hi) - int(c * lo)) for c, _ in specs]
            meta = _step_meta(prior, tables)
            n = meta.slot_mapping.shape[0]
            key = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE) * 2
            backend.write_kv(
                k_cache, v_cache, key, torch.randn(key.shape, generator=g).to(DEVICE), meta.slot_mapping
            )
        meta = _step_meta(specs, tables)
        n = meta.slot_mapping.shape[0]
        key = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE) * 2
        backend.write_kv(
            k_cache, v_cache, key, torch.randn(key.shape, generator=g).to(DEVICE), meta.slot_mapping
        )
        query = torch.randn(n, num_heads, head_dim, generator=g).to(DEVICE) * 2
        out, lse = backend.forward(query, k_cache, v_cache, meta, head_dim**-0.5)
        results.append((backend, k_cache, out, lse))
    (ref, ref_k, ref_out, ref_lse), (tri, tri_k, tri_out, tri_lse) = results
    assert tri.triton and tri.sparse_calls == 1 and ref.sparse_tokens > 0
    assert torch.equal(tri_k, ref_k) and torch.equal(tri.kmin, ref.kmin) and torch.equal(tri.kmax, ref.kmax)
    tol = dict(atol=1e-4, rtol=1e-4) if INTERPRET else dict(atol=1e-2, rtol=1e-2)  # GPU: TF32 dots
    torch.testing.assert_close(tri_out.cpu(), ref_out.cpu(), **tol)
    torch.testing.assert_close(tri_lse.cpu(), ref_lse.cpu(), **tol)
