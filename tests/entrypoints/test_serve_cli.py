"""`fapool serve` as a process (OS-chosen port, SIGINT exits cleanly) and `fapool bench serve`
against a live server."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
from server_helpers import start_server, tiny_engine_args

from fapool.bench import serve_bench
from fapool.entrypoints.cli import build_parser
from fapool.entrypoints.llm import build_engine


@contextlib.contextmanager
def _serve(model: str, tmp_path, *extra: str):
    """`fapool serve` as a process on an OS-chosen port: (process, base url, log file); killed
    on the way out if it is still running."""
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "fapool.entrypoints.cli", "serve", "--model", model, "--device", "cpu",
           "--block-size", "4", "--port", "0", "--served-model-name", "tiny", "--api-key", "k", *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    deadline, url = time.monotonic() + 60, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        url = m.group(1) if m else time.sleep(0.1)
    try:
        assert url is not None, log.read_text()
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fapool_serve_process(tiny_text_model, tmp_path):
    with _serve(tiny_text_model, tmp_path, "--num-kv-blocks", "64") as (proc, url, log):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=5)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.usage.completion_tokens == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()


def test_second_signal_forces_exit_with_status_1(tiny_text_model, tmp_path):
    """The first SIGINT drains (the running stream may finish); a second cuts the drain short,
    and the exit status says so to a supervisor."""
    args = ("--num-kv-blocks", "300", "--shutdown-timeout", "60")
    with _serve(tiny_text_model, tmp_path, *args) as (proc, url, log):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        stream = client.completions.create(
            model="tiny", prompt="hi", max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))  # the request is running
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None, "the drain should wait for the running stream"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 1, log.read_text()


@pytest.fixture
def bench_ns():
    def ns(*argv):
        return build_parser().parse_args(["bench", "serve", *argv])

    return ns


def test_bench_serve_against_server(tiny_checkpoints, bench_ns, tmp_path):
    """Poisson rates, a closed loop of fixed concurrency, and a replayed trace, each checked
    for complete requests and sane percentiles."""
    trace = tmp_path / "azure.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:15:{46 + i * 0.05:.7f},{8 + i},{4 + i % 3}\n" for i in range(8))
    )
    srv = start_server(build_engine(tiny_engine_args(tiny_checkpoints["llama"][0], max_model_len=256)))
    common = (
        "--base-url",
        srv.base_url,
        "--num-prompts",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--warmup-prompts",
        "2",
        "--no-save",
    )
    try:
        rates = serve_bench.run(bench_ns(*common, "--request-rate", "50,inf", "--len-dist", "uniform"))
        closed = serve_bench.run(bench_ns(*common, "--max-concurrency", "1,4"))
        replay = serve_bench.run(bench_ns(*common, "--trace", str(trace), "--trace-time-scale", "2"))
    finally:
        srv.stop()
    assert [p["load"] for p in rates["points"]] == [50.0, float("inf")]
    assert [p["load"] for p in closed["points"]] == [1, 4]
    for result in (rates, closed, replay):
        for p in result["points"]:
            assert p["completed"] == 8 and p["failed"] == 0 and p["output_tokens_per_s"] > 0
            assert 0 < p["ttft_s"]["p50"] <= p["ttft_s"]["p99"] and p["itl_s"]["p50"] > 0
            assert 0 <= p["goodput_requests_per_s"] <= p["request_throughput"]


def test_bench_serve_refuses_remote_hosts(bench_ns):
    with pytest.raises(ValueError, match="this machine"):
        serve_bench.run(bench_ns("--base-url", "http://10.1.2.3:8000"))


def test_trace_and_engine_argv(tmp_path, bench_ns):
    trace = tmp_path / "azure.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,9000,20\n"
        "2023-11-16 18:15:47.1805900,100,3000\n"
    )
    specs = serve_bench.read_trace(str(trace), 10, time_scale=2.0, max_len=1024)
    assert [round(s.arrival_s, 3) for s in specs] == [0.0, 0.25, 2.157]
    assert [(s.prompt_len, s.output_len) for s in specs] == [(374, 44), (100, 924), (1022, 2)]
    ns = bench_ns("--model", "/m", "--block-size", "8", "--no-prefix-caching", "--tp", "2")
    assert serve_bench.engine_argv(ns) == [
        "--model",
        "/m",
        "--block-size",
        "8",
        "--no-prefix-caching",
        "--tp",
        "2",
    ]


def test_a_taken_port_and_an_unavailable_device_are_one_line_errors(capsys):
    """Exit code 2 and a line saying what to change, not a traceback."""
    import socket

    import torch

    from fapool.entrypoints.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--port", str(port)]) == 2
        assert "Address already in use" in capsys.readouterr().err.replace("\n", " ")
    finally:
        taken.close()
    if not torch.cuda.is_available():
        assert main(["generate", "--device", "cuda", "--prompt", "hi"]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err.replace("\n", " ")
    assert main(["generate", "--device", "tpu", "--prompt", "hi"]) == 2


def test_every_serve_and_generate_flag_has_help():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "generate"):
        missing = [a.option_strings for a in sub.choices[name]._actions if a.option_strings and not a.help]
        assert not missing, (name, missing)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_returns_after_rejected_large_bodies(tiny_text_model, tmp_path):
    """Bodies just under the 8 MiB limit, read, parsed and refused as overlong prompts, leave the
    server's memory where it was, within a margin, not gigabytes up. (Bodies over the limit are
    answered 413 before they are read: test_server_errors.)"""
    import httpx

    with _serve(tiny_text_model, tmp_path, "--num-kv-blocks", "64") as (proc, url, log):
        auth = {"Authorization": "Bearer k"}
        httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, headers=auth)
        before = _rss_mb(proc.pid)
        under = {"model": "tiny", "prompt": "x" * (7 << 20)}
        for _ in range(8):
            assert httpx.post(f"{url}/v1/completions", json=under, headers=auth, timeout=60).status_code == 400
        grown = _rss_mb(proc.pid) - before
        print(f"server RSS {before:.0f} MB, after 8 rejected 7 MB bodies +{grown:.0f} MB")
        assert grown < 150, log.read_text()
