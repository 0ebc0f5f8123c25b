"""SamplingParams validation and the sampler's filters."""

import pytest
import torch

from fapool.layers.sampler import SampleRow, sample
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


def _draw(logits, params, n=200):
    g = torch.Generator().manual_seed(0)
    return {sample(logits, [SampleRow(0, params, g)])[0][0] for _ in range(n)}


def test_filters_restrict_the_support():
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.0, -1.0]])
    assert _draw(logits, SamplingParams(temperature=0.0)) == {0}
    assert _draw(logits, SamplingParams(temperature=1.0, top_k=1)) == {0}
    assert _draw(logits, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    # p(0) ~ 0.40, p(1) ~ 0.36: top_p 0.5 keeps the first two.
    assert _draw(logits, SamplingParams(temperature=1.0, top_p=0.5)) == {0, 1}
    assert _draw(logits, SamplingParams(temperature=1.0, top_p=0.3)) == {0}
    # min_p 0.5 keeps tokens with p >= 0.5 * p_max: exp(-1) = 0.37 -> drops index 2 and below.
    assert _draw(logits, SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}
    assert _draw(logits, SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}


def test_rows_use_their_own_generators():
    logits = torch.zeros(2, 50)
    p = SamplingParams(temperature=1.0)
    a = sample(logits, [SampleRow(0, p, torch.Generator().manual_seed(1)), SampleRow(1, p, torch.Generator().manual_seed(1))])[0]
    assert a[0] == a[1]
