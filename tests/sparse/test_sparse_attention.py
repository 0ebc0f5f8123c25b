"""Sparse decode against dense attention: exact at full budget, the same math on the selected
blocks otherwise, and block summaries kept right as KV is written."""

import math

import pytest
import torch

from fapool.attention import AttentionMetadata, TorchReferenceBackend
from fapool.attention.sparse import SparseAttentionBackend, SparseGate
from fapool.sparse.selection import block_order, budget_blocks

H, HKV, D, BS = 6, 3, 16, 4


def _case(specs, seed=0):
    """specs: (context_len, query_len) per sequence; K/V written through the backend."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.ceil((c + q) / BS) for c, q in specs) + 2
    perm = torch.randperm(total, generator=g).tolist()
    tables = [[perm.pop() for _ in range(math.ceil((c + q) / BS))] for c, q in specs]
    slots = [t[i // BS] * BS + i % BS for t, (c, q) in zip(tables, specs) for i in range(c + q)]
    n = len(slots)
    keys = torch.randn(n, HKV, D, generator=g) * 2
    values = torch.randn(n, HKV, D, generator=g)
    step_slots = [t[i // BS] * BS + i % BS for t, (c, q) in zip(tables, specs) for i in range(c, c + q)]
    meta = AttentionMetadata.build(
        query_lens=[q for _, q in specs],
        query_pos_start=[c for c, _ in specs],
        kv_lens=[c + q for c, q in specs],
        block_tables=tables,
        slot_mapping=step_slots,
    )
    query = torch.randn(sum(q for _, q in specs), H, D, generator=g) * 2
    return query, keys, values, torch.tensor(slots), total, meta


def _run(backend, specs, seed=0, chunks=3):
    query, keys, values, slots, total, meta = _case(specs, seed)
    k_cache = torch.zeros(total, BS, HKV, D)
    v_cache = torch.zeros_like(k_cache)
    # Write in a few steps, as an engine would, so summaries are updated incrementally.
    for part in torch.tensor_split(torch.arange(len(slots)), chunks):
        backend.write_kv(k_cache, v_cache, keys[part], values[part], slots[part])
    return backend.forward(query, k_cache, v_cache, meta, D**-0.5), (query, k_cache, v_cache, meta)


SPECS = [(37, 1), (5, 1), (20, 3), (64, 1), (0, 4)]


def test_full_budget_is_exactly_dense():
    dense = TorchReferenceBackend()
    (out, lse), args = _run(SparseAttentionBackend(dense, [1.0] * HKV), SPECS)
    ref_out, ref_lse = dense.forward(*args, D**-0.5)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_gate_runs_dense_below_min_context_and_sparse_from_it():
    """The step's longest KV is 65 (SPECS): a gate at 66 leaves it dense bit for bit and the
    sparse counters untouched; at 65 the same budget takes the sparse path."""
    dense = TorchReferenceBackend()
    shut = SparseAttentionBackend(dense, [0.25, 0.5, 0.1], min_blocks=3, gate=SparseGate(66))
    (out, lse), args = _run(shut, SPECS)
    assert args[3].max_kv_len == 65
    ref_out, ref_lse = dense.forward(*args, D**-0.5)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert shut.sparse_tokens == shut.sparse_dense_tokens == 0
    opened = SparseAttentionBackend(dense, [0.25, 0.5, 0.1], min_blocks=3, gate=SparseGate(65))
    (out, _), _ = _run(opened, SPECS)
    assert 0 < opened.sparse_tokens < opened.sparse_dense_tokens
    assert not torch.equal(out, ref_out)
    # Summaries are kept while the gate is shut, so opening it later finds them complete.
    assert shut.kmin is not None and torch.equal(shut.kmin, opened.kmin) and torch.equal(shut.kmax, opened.kmax)


def test_gate_pinned_overrides_the_length_and_rejects_negative():
    gate = SparseGate(100)
    assert not gate.active(99) and gate.active(100)
    gate.pinned = True
    assert gate.active(0)
    gate.pinned = False
    assert not gate.active(10**6)
    with pytest.raises(ValueError, match="min_context"):
        SparseGate(-1)


def test_sparse_path_with_every_block_matches_dense():
    """Force the sparse path (budget just under full is rounded up to all blocks for short
    rows; use min_blocks=0 and a budget of all blocks minus none via a spy)."""
    dense = TorchReferenceBackend()
    sparse = SparseAttentionBackend(dense, [1.0] * HKV)
    (_, _), (query, k_cache, v_cache, meta) = _run(sparse, SPECS)
    seqs = [0, 1, 3]
    tok = torch.tensor([meta.query_start_loc[s] for s in seqs])
    n_kv = torch.tensor([meta.kv_lens_cpu[s] for s in seqs])
    budgets = torch.tensor([[math.ceil(n / BS)] * HKV for n in n_kv.tolist()])
    out, lse = sparse.sparse_decode(
        query[tok], k_cache, v_cache, meta.block_tables[seqs], n_kv, budgets, D**-0.5
    )
    ref_out, ref_lse = dense.forward(query, k_cache, v_cache, meta, D**-0.5)
    torch.testing.assert_close(out, ref_out[tok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse[tok], rtol=1e-5, atol=1e-5)


def test_sparse_equals_dense_over_selected_blocks():
    """With a small budget, each head's result is dense attention over exactly the blocks the
    selector picked (sink, recent, and the best bounds), and lse never exceeds dense's."""
    dense = TorchReferenceBackend()
    sparse = SparseAttentionBackend(dense, [0.25, 0.5, 0.1], min_blocks=3)
    (out, lse), (query, k_cache, v_cache, meta) = _run(sparse, SPECS)
    ref_out, ref_lse = dense.forward(query, k_cache, v_cache, meta, D**-0.5)
    # Prefill rows and short sequences go to the dense backend (in a smaller decode batch, so
    # equal up to the rounding of a different padding).
    for s in (1, 2, 4):
        a, b = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        torch.testing.assert_close(out[a:b], ref_out[a:b], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[a:b], ref_lse[a:b], rtol=1e-6, atol=1e-6)
    for s in (0, 3):
        t = int(meta.query_start_loc[s])
        n = meta.kv_lens_cpu[s]
        nb = math.ceil(n / BS)
        table = meta.block_tables[s, :nb].long()
        kmin = k_cache[table].amin(1)  # [nb, Hkv, D]: blocks are full except the last (always kept)
        kmax = k_cache[table].amax(1)
        assert torch.allclose(sparse.kmin[table[:-1]], kmin[:-1]) and torch.allclose(
            sparse.kmax[table[:-1]], kmax[:-1]
        )
        q = query[t].view(HKV, H // HKV, D)
        for h in range(HKV):
            bound = (q[h].clamp(min=0) @ kmax[:, h].T + q[h].clamp(max=0) @ kmin[:, h].T).amax(0)
            k = int(budget_blocks(sparse.budget, nb, 3)[h])
            assert k < nb
            order = block_order(bound.view(1, 1, -1), torch.tensor([nb]))[0, 0, :k]
            assert 0 in order.tolist() and nb - 1 in order.tolist()
            pos = torch.cat([torch.arange(b * BS, min((b + 1) * BS, n)) for b in sorted(order.tolist())])
            keys = k_cache[table[pos // BS], pos % BS, h]
            vals = v_cache[table[pos // BS], pos % BS, h]
            s_ = q[h] @ keys.T * D**-0.5
            heads = slice(h * (H // HKV), (h + 1) * (H // HKV))
            torch.testing.assert_close(lse[t, heads], torch.logsumexp(s_, -1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[t, heads], torch.softmax(s_, -1) @ vals, rtol=1e-5, atol=1e-5)
            assert bool((lse[t, heads] <= ref_lse[t, heads] + 1e-6).all())


def test_summaries_follow_block_reuse():
    """A block refilled from offset 0 by another sequence is summarised from its new keys only."""
    sparse = SparseAttentionBackend(TorchReferenceBackend(), [0.5] * HKV)
    k_cache = torch.zeros(2, BS, HKV, D)
    v_cache = torch.zeros_like(k_cache)
    big = torch.full((BS, HKV, D), 100.0)
    sparse.write_kv(k_cache, v_cache, big, big, torch.arange(BS))
    small = torch.randn(2, HKV, D)
    sparse.write_kv(k_cache, v_cache, small, small, torch.tensor([0, 1]))
    assert torch.equal(sparse.kmax[0], small.amax(0)) and torch.equal(sparse.kmin[0], small.amin(0))


@pytest.mark.parametrize(
    "frac,n,minb,want", [(0.1, 100, 4, 10), (0.01, 100, 4, 4), (0.5, 3, 4, 3), (1.0, 7, 1, 7)]
)
def test_budget_blocks(frac, n, minb, want):
    assert int(budget_blocks(torch.tensor([frac]), n, minb)) == want
