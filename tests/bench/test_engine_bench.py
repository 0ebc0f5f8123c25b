"""`fapool bench throughput` on a tiny checkpoint: on a CPU, fapool and HF generate are timed
iteration by iteration in alternation, and every iteration's time is kept."""

import argparse

import pytest
from tiny_models import make_checkpoint

from fapool.bench.engine_bench import add_parser, run_bench


def test_throughput_bench_times_hf_beside_each_iteration(tmp_path):
    folder = str(tmp_path / "llama")
    make_checkpoint(folder, "llama", seed=3)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    ns = parser.parse_args(
        ["throughput", "--model", folder, "--device", "cpu", "--num-prompts", "2", "--input-len", "8",
         "--output-len", "4", "--iters", "3", "--no-save"]
    )
    result = run_bench("throughput", ns)
    assert result["interleaved_with_hf"]
    ours, hf, speedup = result["fapool"], result["hf"], result["speedup_vs_hf"]
    assert len(ours["e2e_runs_s"]) == len(hf["e2e_runs_s"]) == 3
    assert all(t > 0 for t in ours["e2e_runs_s"] + hf["e2e_runs_s"])
    assert speedup["throughput"] > 0 and speedup["throughput_paired"] > 0
    assert speedup["throughput"] == pytest.approx(hf["e2e_s"] / ours["e2e_s"])
