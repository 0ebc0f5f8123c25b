"""Each supported hidden_act equals transformers' function of the same name."""

import pytest
import torch
from transformers.activations import ACT2FN

from fapool.config import SUPPORTED_ACTIVATIONS
from fapool.layers.activation import Activation


@pytest.mark.parametrize("name", SUPPORTED_ACTIVATIONS)
def test_activation_matches_transformers(name):
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(Activation(name)(x), ACT2FN[name](x), rtol=1e-6, atol=1e-6)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unsupported activation"):
        Activation("swish2")
