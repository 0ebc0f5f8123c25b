import pytest

from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import get_hardware


@pytest.fixture(scope="session")
def h100_cost() -> CostModel:
    return CostModel(load_model_config("seed000"), get_hardware("h100"))


@pytest.fixture(scope="session")
def gqa_cost() -> CostModel:
    """seed000 with 8 KV heads (GQA): a second model shape for the AFD checks."""
    return CostModel(load_model_config("seed000").replace(num_key_value_heads=8), get_hardware("h100"))
