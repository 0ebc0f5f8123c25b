"""Head-parallel placement policies: exact assignments on small cases and input checks.

(tests/sparse/test_placement.py checks LPT's quality against the optimum; these pin outputs.)
"""

import pytest

from fapool.core.head_placement import HEAD_POLICIES, contiguous_heads, lpt_heads


def test_policies_registry():
    assert HEAD_POLICIES == {"contiguous": contiguous_heads, "lpt": lpt_heads}


def test_contiguous_even_split():
    assert contiguous_heads(8, [1, 2]) == {1: [0, 1, 2, 3], 2: [4, 5, 6, 7]}


def test_contiguous_uneven_split_keeps_runs_and_order_of_workers():
    assert contiguous_heads(8, [1, 2, 3]) == {1: [0, 1], 2: [2, 3, 4], 3: [5, 6, 7]}
    assert contiguous_heads(5, [7, 3]) == {7: [0, 1], 3: [2, 3, 4]}  # runs follow the given order
    assert contiguous_heads(3, [1, 2, 3]) == {1: [0], 2: [1], 3: [2]}
    assert contiguous_heads(4, [9]) == {9: [0, 1, 2, 3]}


def test_contiguous_ignores_weights():
    assert contiguous_heads(4, [1, 2], [10.0, 1.0, 1.0, 1.0]) == {1: [0, 1], 2: [2, 3]}


@pytest.mark.parametrize("policy", [contiguous_heads, lpt_heads])
def test_too_few_heads_or_no_workers_rejected(policy):
    with pytest.raises(ValueError, match="at least one KV head per worker"):
        policy(2, [1, 2, 3])
    with pytest.raises(ValueError, match="at least one KV head per worker"):
        policy(4, [])


def test_lpt_unweighted_deals_heads_round_robin():
    assert lpt_heads(4, [1, 2]) == {1: [0, 2], 2: [1, 3]}
    assert lpt_heads(5, [1, 2, 3]) == {1: [0, 3], 2: [1, 4], 3: [2]}


def test_lpt_heaviest_head_alone():
    assert lpt_heads(5, [1, 2], [5.0, 1.0, 1.0, 1.0, 1.0]) == {1: [0], 2: [1, 2, 3, 4]}


def test_lpt_balances_weights():
    # Order by weight: 1 (0.9), 3 (0.6), 0 (0.5), 2 (0.4) -> 1:A, 3:B, 0:B (0.6 < 0.9), 2:A
    assert lpt_heads(4, [10, 20], [0.5, 0.9, 0.4, 0.6]) == {10: [1, 2], 20: [0, 3]}


def test_lpt_every_worker_gets_a_head_even_with_one_dominant_weight():
    out = lpt_heads(3, [1, 2, 3], [100.0, 0.0, 0.0])
    assert out == {1: [0], 2: [1], 3: [2]}  # ties on load broken by head count, then worker id


def test_lpt_weight_count_must_match_heads():
    with pytest.raises(ValueError, match="3 head weights for 4 KV heads"):
        lpt_heads(4, [1, 2], [1.0, 1.0, 1.0])
