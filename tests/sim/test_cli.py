import json

import pytest

from fapool.bench.calibrate import calibrate
from fapool.sim.calibrate import apply_calibration, fit_roofline, load_calibration
from fapool.entrypoints.cli import main
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import get_hardware

TINY = {
    "gemm_m": [1, 32],
    "gemm_nk": [(64, 64), (128, 64)],
    "decode": [(2, 2, 64, 16), (2, 2, 256, 16)],
    "prefill": [(1, 2, 64, 16)],
    "comm_bytes": [1024, 65536],
}


def test_simulate_all_strategies_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main(
        [
            "simulate",
            "--num-requests",
            "40",
            "--rate",
            "4",
            "--strategy",
            "static,fapool,afd,head",
            "--pool-size",
            "4",
            "--afd-r",
            "2",
            "--max-len",
            "8192",
            "--no-progress",
            "--tpot-slo",
            "50",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "simulated" in text and "SLO" in text
    runs = json.loads(out.read_text())
    assert [r["requests_finished"] for r in runs] == [40, 40, 40, 40]
    assert all(0 <= r["slo_attainment"] <= 1 for r in runs)


def test_simulate_from_a_trace(tmp_path, capsys, write_trace):
    trace = tmp_path / "t.csv"
    write_trace(trace, [0.0, 0.1, 0.5, 0.7], [100, 3000, 500, 9000], [20, 5, 40, 8])
    assert (
        main(
            [
                "simulate",
                "--trace",
                str(trace),
                "--strategy",
                "fapool",
                "--pool-size",
                "2",
                "--threshold",
                "1024",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "t.csv: 4 requests" in capsys.readouterr().out


def test_plan_prints_a_recommendation(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--tpot-slo",
            "30",
            "--max-gpus",
            "12",
            "--verify-steps",
            "40",
            "--prompt",
            "uniform:1000,3000",
            "--output",
            "exp:64",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommend:" in text and "r*=" in text
    plan = json.loads(out.read_text())
    assert len(plan["rows"]) == 4 and 0 <= plan["recommended"] < 4
    # Each row names the engine arguments of its topology; the recommended one is what
    # `--plan` gives the engine.
    by_kind = {r["kind"]: r["engine_args"] for r in plan["rows"]}
    assert set(by_kind["afd"]) == {"afd_attention_ranks", "afd_ffn_ranks"}
    assert by_kind["head-parallel"]["pool_threshold"] == 0 and by_kind["head-parallel"]["pool_mode"] == "head"
    assert by_kind["fapool"]["attention_workers"] >= 1
    assert plan["engine_args"] == plan["rows"][plan["recommended"]]["engine_args"]
    from fapool.engine.arg_utils import EngineArgs

    planned = EngineArgs(plan=str(out)).with_plan()
    for name, value in plan["engine_args"].items():
        assert getattr(planned, name) == value


@pytest.mark.parametrize(
    "argv,match",
    [
        (["plan", "--model", "llama-9000"], "unknown model"),
        (["simulate", "--hardware", "tpu-v9", "--no-progress"], "unknown hardware"),
        (["plan", "--tpot-slo", "0.001", "--verify-steps", "0"], "cannot be met"),
        (["plan", "--tpot-slo", "-5"], "must be > 0"),
        (["simulate", "--strategy", "magic", "--no-progress"], "unknown strategy"),
        (["simulate", "--prompt", "gauss:5", "--no-progress"], "bad length distribution"),
        (["simulate", "--strategy", "static", "--pp", "5", "--no-progress"], "exceeds"),
        (["plan", "--calibration", "/nonexistent.json"], "not found"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, match, capsys):
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert err.startswith("error:") and match in err


def test_malformed_trace_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,ten,5\n")
    assert main(["simulate", "--trace", str(bad), "--no-progress"]) == 2
    assert "bad.csv:3: malformed trace row" in " ".join(capsys.readouterr().err.split())


def test_fit_roofline_recovers_known_rates():
    flops = [2e6, 2e8, 2e10, 4e10, 1e6]
    nbytes = [4e6, 5e6, 6e7, 1e8, 4e8]
    o, F, B = 5e-6, 1e12, 1e11
    t = [o + max(f / F, b / B) for f, b in zip(flops, nbytes, strict=True)]
    fit = fit_roofline(flops, nbytes, t)
    assert fit["flops_per_s"] == pytest.approx(F, rel=0.02)
    assert fit["bytes_per_s"] == pytest.approx(B, rel=0.02)
    assert fit["mean_abs_log_err"] < 0.01


def test_calibrate_tiny_and_apply(tmp_path):
    cal = calibrate(device="cpu", grid=TINY, collectives=True, engine=False)
    assert cal["device_kind"] == "cpu" and cal["dtype_bytes"] == 4
    assert len(cal["samples"]["gemm"]) == 4 and len(cal["samples"]["decode"]) == 2
    assert cal["gemm"]["flops_per_s"] > 0 and cal["attention"]["bytes_per_s"] > 0
    assert cal["comm"]["p2p"]["bytes_per_s"] > 0  # the engine's own transport, two processes
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    hw = apply_calibration(get_hardware("cpu"), load_calibration(path))
    assert hw.gemm_flops == cal["gemm"]["flops_per_s"] and "calibration" in hw.source
    cost = CostModel(load_model_config("seed000"), hw)
    assert cost.gemm(16, 4096, 4096) > 0


def test_calibrate_cli(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert (
        main(["calibrate", "--device", "cpu", "--no-collectives", "--no-engine", "--threads", "1", "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["comm"] is None
    assert "GEMM:" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--calibration", str(bad)]) == 2


def test_plan_from_a_trace(tmp_path, capsys, write_trace):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 300
    trace = tmp_path / "azure.csv"
    write_trace(trace, np.sort(rng.random(n) * 60), rng.integers(200, 4000, n), rng.integers(5, 300, n))
    assert (
        main(["plan", "--trace", str(trace), "--tpot-slo", "40", "--max-gpus", "12", "--verify-steps", "30"])
        == 0
    )
    assert "recommend:" in capsys.readouterr().out
