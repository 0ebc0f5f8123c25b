"""Sparse decode split across holders, without processes: the pages each holder gets of a
selection, attended and merged by lse, equal attention over the whole selection."""

import torch

from fapool.attention.backend import merge_tree
from fapool.attention.sparse import attend_selected
from fapool.sparse.selection import compact_selection, pages_in_range, select_block_indices

BS = 4


def _setup(seed=0, rows=3, heads=2, group=2, dim=8, num_blocks=64):
    g = torch.Generator().manual_seed(seed)
    nkv = torch.tensor([37, 18, 53])[:rows]  # partial last blocks
    nb = (nkv + BS - 1) // BS
    width_all = int(nb.max())
    # Each row's blocks: a permutation of page ids, so a wrong mapping reads other keys.
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width_all] for _ in range(rows)])
    k_cache = torch.randn(num_blocks, BS, heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, BS, heads, dim, generator=g)
    q = torch.randn(rows, heads * group, dim, generator=g)
    score = torch.randn(rows, heads, width_all, generator=g)
    budgets = torch.tensor([[5, 2], [3, 4], [9, 1]])[:rows]
    return q, k_cache, v_cache, tables, nkv, nb, score, budgets


def test_holders_pages_merge_to_the_whole_selection():
    q, k_cache, v_cache, tables, nkv, nb, score, budgets = _setup()
    width = int(budgets.max())
    pages, lens = compact_selection(score, nkv, budgets, tables, BS, width)
    want_o, want_l = attend_selected(q, k_cache, v_cache, pages, lens, 0.3)

    chosen = select_block_indices(score, nb, budgets, width)
    # Three holders per row: blocks [0, 3), [3, 7), [7, nb): a local part and two segments.
    cuts = [torch.zeros_like(nb), torch.full_like(nb, 3), torch.full_like(nb, 7), nb]
    outs, lses = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        table = torch.stack([tables[b, lo[b] : lo[b] + 8] for b in range(len(nb))])  # the holder's pages
        p, ln = pages_in_range(chosen, nkv, table, lo, hi, BS, width)
        assert int(ln.max()) <= width * BS
        o, l = attend_selected(q, k_cache, v_cache, p, ln, 0.3)
        outs.append(o)
        lses.append(l)
    got_o, got_l = merge_tree(outs, lses)
    torch.testing.assert_close(got_o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-5)


def test_a_head_with_nothing_chosen_in_range_is_empty():
    q, k_cache, v_cache, tables, nkv, nb, score, budgets = _setup(seed=1)
    chosen = select_block_indices(score, nb, budgets, int(budgets.max()))
    # Blocks 1..2 of row 0, head 1 (budget 2: only sink 0 and the recent block) are not chosen.
    lo, hi = torch.tensor([1, 1, 1]), torch.tensor([3, 3, 3])
    p, ln = pages_in_range(chosen, nkv, tables[:, 1:3], lo, hi, BS, 2)
    assert int(ln[0, 1]) == 0
    o, l = attend_selected(q, k_cache, v_cache, p, ln, 0.3)
    assert torch.isneginf(l[0, 2:]).all() and (o[0, 2:] == 0).all()  # query heads 2, 3 read KV head 1
    assert torch.isfinite(o).all()
