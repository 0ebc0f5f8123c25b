import csv

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


@pytest.fixture
def cpu_calibration() -> dict:
    """A minimal CPU calibration (schema 3: GEMM and attention rates, no engine or pool terms),
    for the tests that add one section to it and read it back."""
    return {"schema": 3, "device_kind": "cpu", "device_name": "test", "dtype_bytes": 4,
            "gemm": {"flops_per_s": 5e10, "bytes_per_s": 4e9, "overhead_s": 1e-5},
            "attention": {"flops_per_s": 1e9, "bytes_per_s": 1e9, "overhead_s": 4e-4},
            "engine": None, "pool": None, "cpu_cores": 2}


@pytest.fixture(scope="session")
def write_trace():
    """Writes an Azure-format trace CSV (TIMESTAMP in seconds, ContextTokens, GeneratedTokens)."""

    def write(path, arrival, prompt_len, output_len) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
            for t, p, g in zip(arrival, prompt_len, output_len, strict=True):
                w.writerow([f"{float(t):.6f}", int(p), int(g)])

    return write
