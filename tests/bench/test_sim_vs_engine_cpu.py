"""benchmarks/sim_vs_engine_cpu.py's bound on what any prediction can reach over noisy runs."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "sim_vs_engine_cpu.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("sim_vs_engine_cpu", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_within_counts_what_one_prediction_can_cover(script):
    assert script.best_within([1.0, 1.0, 1.0]) == 3
    assert script.best_within([1.0, 1.19, 1.0]) == 3  # p = 1.09 is within 10% of all three
    assert script.best_within([1.0, 1.25, 1.0]) == 2  # no p is within 10% of both 1.0 and 1.25
    assert script.best_within([1.0, 1.5, 2.3]) == 1


def test_across_runs_reports_the_simulator_against_the_bound(script, tmp_path, capsys):
    paths = []
    for i, measured in enumerate([0.100, 0.118]):  # 0.105 is 11% under the second
        rows = [{"config": "single", "measured_s": measured, "predicted_s": 0.105,
                 "rel_error": 0.105 / measured - 1}]
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    assert script.across_runs([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "simulator within 10% on 1/2, best possible 2/2" in out
    assert "row-runs within 10%: simulator 1/2, best possible 2/2" in out
