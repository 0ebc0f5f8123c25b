"""`fapool bench serve`: load an OpenAI-compatible server and measure what clients see.

Arrivals are Poisson at each --request-rate (or all at once under a --max-concurrency cap,
i.e. a closed loop of C clients), or replayed from an Azure-format trace CSV (TIMESTAMP,
ContextTokens, GeneratedTokens). Prompts are random token ids (no prefix-cache hits) sent to
/v1/completions with ignore_eos, so each request generates exactly its output length.
Reports throughput, goodput under TTFT/TPOT SLOs and TTFT/TPOT/ITL/e2e percentiles per load
point; writes JSON to benchmarks/results/ and a latency-vs-load PNG to benchmarks/plots/.

Without --base-url it starts `fapool serve` itself on 127.0.0.1 with an OS-chosen port and
the engine options given here; --base-url may only name this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, repo_root, write_result
from fapool.engine.arg_utils import EngineArgs

console = Console()
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Spec:
    prompt_len: int
    output_len: int
    arrival_s: float  # offset from the start of the run


@dataclass
class Result:
    spec: Spec
    ok: bool = False
    status: int = 0
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# Workloads ----------------------------------------------------------------------------------------
def sample_lengths(n: int, mean: int, dist: str, ratio: float, rng: random.Random) -> list[int]:
    if dist == "fixed":
        return [mean] * n
    if dist == "uniform":
        lo, hi = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
        return [rng.randint(lo, hi) for _ in range(n)]
    if dist == "exponential":
        return [max(1, round(rng.expovariate(1 / mean))) for _ in range(n)]
    raise ValueError(f"unknown length distribution {dist!r}")


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    # Azure traces: "2023-11-16 18:15:46.6805900" (7 fractional digits; Python takes 6).
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())
    return dt.datetime.fromisoformat(value).timestamp()


def read_trace(path: str, limit: int, time_scale: float, max_len: int) -> list[Spec]:
    """Azure LLM inference trace rows -> specs, times relative to the first row and divided by
    time_scale (2 = twice as fast), lengths clipped to fit max_len."""
    specs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row = {k.strip(): v for k, v in row.items()}
            t = _parse_time(row["TIMESTAMP"])
            prompt = max(1, min(int(row["ContextTokens"]), max_len - 2))
            out = max(1, min(int(row["GeneratedTokens"]), max_len - prompt))
            specs.append(Spec(prompt, out, t))
            if len(specs) >= limit:
                break
    if not specs:
        raise ValueError(f"trace {path} has no rows")
    t0 = min(s.arrival_s for s in specs)
    for s in specs:
        s.arrival_s = (s.arrival_s - t0) / time_scale
    return sorted(specs, key=lambda s: s.arrival_s)


def make_specs(ns: argparse.Namespace, rate: float, max_len: int) -> list[Spec]:
    rng = random.Random(ns.bench_seed)
    ins = sample_lengths(ns.num_prompts, ns.input_len, ns.len_dist, ns.range_ratio, rng)
    outs = sample_lengths(ns.num_prompts, ns.output_len, ns.len_dist, ns.range_ratio, rng)
    arrivals = poisson_arrivals(ns.num_prompts, rate, rng)
    specs = []
    for i, o, t in zip(ins, outs, arrivals):
        i = min(i, max_len - 2)
        specs.append(Spec(i, max(1, min(o, max_len - i)), t))
    return specs


# Load -------------------------------------------------------------------------------------------
async def send(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], spec: Spec, headers: dict[str, str]
) -> Result:
    res = Result(spec)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message")
                    return res
                now = time.perf_counter()
                for choice in chunk.get("choices", []):
                    n = len(choice.get("token_ids") or [])
                    if not n:
                        continue
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.output_tokens += n
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens == spec.output_len
        if not res.ok:
            res.error = f"got {res.output_tokens} tokens, expected {spec.output_len}"
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def run_load(
    base_url: str,
    model: str,
    specs: list[Spec],
    vocab: int,
    concurrency: int | None,
    api_key: str | None,
    seed: int,
) -> tuple[list[Result], float]:
    rng = random.Random(seed + 1)
    low = min(100, vocab // 2)
    prompts = [[rng.randrange(low, vocab) for _ in range(s.prompt_len)] for s in specs]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        url = f"{base_url}/v1/completions"
        t0 = time.perf_counter()

        async def one(spec: Spec, prompt: list[int]) -> Result:
            await asyncio.sleep(max(0.0, spec.arrival_s - (time.perf_counter() - t0)))
            if sem is None:
                return await send(client, url, model, prompt, spec, headers)
            async with sem:
                return await send(client, url, model, prompt, spec, headers)

        results = await asyncio.gather(*(one(s, p) for s, p in zip(specs, prompts)))
        return list(results), time.perf_counter() - t0


# Figures --------------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(values)

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": statistics.fmean(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def summarize(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "rejected_429": sum(r.status == 429 for r in results),
        "failed": sum(not r.ok and r.status != 429 for r in results),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(r.spec.prompt_len for r in ok)) / duration,
        "goodput_requests_per_s": len(good) / duration,
        "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error and r.status != 429})[:5],
    }


def plot(points: list[dict[str, Any]], load_label: str, title: str, path: str) -> None:
    """Latency percentiles against the achieved request throughput; each point is labelled
    with its offered load (a rate may be inf, so the offered load cannot be the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["request_throughput"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name in zip(axes, ("ttft_s", "tpot_s", "itl_s"), ("TTFT", "TPOT", "ITL")):
        for pct, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [(p[key][pct] or float("nan")) * 1e3 for p in points]
            ax.plot(xs, ys, style, label=pct)
        for x, p in zip(xs, points):
            y = (p[key]["p50"] or float("nan")) * 1e3
            ax.annotate(
                f"{p['load']:g}",
                (x, y),
                textcoords="offset points",
                xytext=(0, -12),
                fontsize=7,
                ha="center",
                color="tab:blue",
            )
        ax.set_xlabel("achieved throughput (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}\n(labels: offered {load_label})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Server ----------------------------------------------------------------------------------------------
def engine_argv(ns: argparse.Namespace) -> list[str]:
    """The engine options of ns that differ from their defaults, as `fapool serve` flags."""
    p = argparse.ArgumentParser(add_help=False)
    EngineArgs.add_cli_args(p)
    argv: list[str] = []
    for a in p._actions:
        value = getattr(ns, a.dest, a.default)
        if not a.option_strings or value == a.default:
            continue
        argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], str(value)]
    return argv


class ServerProcess:
    """`fapool serve` on 127.0.0.1, port chosen by the OS, its log in a temporary file."""

    def __init__(self, ns: argparse.Namespace, max_waiting: int) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fapool-serve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "fapool.entrypoints.cli",
            "serve",
            *engine_argv(ns),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-waiting",
            str(max_waiting),
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=repo_root())
        self.base_url = self._wait_for_url(ns.server_timeout)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.log.name) as f:
                m = re.search(r"serving .* on (http://\S+)", f.read())
            if m:
                url = m.group(1)
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        with open(self.log.name) as f:
            raise RuntimeError(f"fapool serve did not come up:\n{f.read()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def check_local(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"--base-url must point at this machine ({', '.join(LOCAL_HOSTS)}), not {host!r}")
    return url.rstrip("/")


def scrape(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


# Main -----------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run(ns: argparse.Namespace) -> dict[str, Any]:
    server = None if ns.base_url else ServerProcess(ns, ns.max_waiting)
    base_url = check_local(ns.base_url) if ns.base_url else server.base_url
    try:
        headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
        card = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()["data"][0]
        model, max_len, vocab = card["id"], card.get("max_model_len") or 2048, card.get("vocab_size") or 32000
        if ns.trace:
            mode, loads = "trace time scale", _floats(ns.trace_time_scale)
        elif ns.request_rate:
            mode, loads = "request rate (req/s)", _floats(ns.request_rate)
        else:
            mode, loads = "concurrency", [int(c) for c in _floats(ns.max_concurrency or "1")]
        cap = int(_floats(ns.max_concurrency)[0]) if ns.max_concurrency and mode != "concurrency" else None

        # Warm up at full load with the run's own lengths (kernel compilation, allocation).
        warm = make_specs(ns, math.inf, max_len)[: ns.warmup_prompts] or [Spec(min(8, max_len - 2), 2, 0.0)]
        asyncio.run(run_load(base_url, model, warm, vocab, None, ns.api_key, ns.bench_seed + 7))
        points = []
        for load in loads:
            if ns.trace:
                specs = read_trace(ns.trace, ns.num_prompts, load, max_len)
            else:
                specs = make_specs(ns, load if mode.startswith("request") else math.inf, max_len)
            conc = load if mode == "concurrency" else cap
            preempt0 = scrape(base_url, "fapool_num_preemptions_total")
            results, duration = asyncio.run(
                run_load(base_url, model, specs, vocab, conc, ns.api_key, ns.bench_seed)
            )
            point = {
                "load": load,
                **summarize(results, duration, ns.slo_ttft_ms / 1e3, ns.slo_tpot_ms / 1e3),
                "preemptions": scrape(base_url, "fapool_num_preemptions_total") - preempt0,
            }
            points.append(point)
            _print_point(mode, point)
    finally:
        if server is not None:
            server.stop()

    device = "cpu" if (ns.device or "") == "cpu" else (ns.device or _guess_device())
    result = {
        "env": environment(device),
        "server": {
            "base_url": ns.base_url or "self-started",
            "model": model,
            "max_model_len": max_len,
            "engine_argv": engine_argv(ns),
        },
        "workload": {
            "mode": mode,
            "num_prompts": ns.num_prompts,
            "input_len": ns.input_len,
            "output_len": ns.output_len,
            "len_dist": ns.len_dist,
            "range_ratio": ns.range_ratio,
            "trace": ns.trace,
            "max_concurrency_cap": cap,
            "seed": ns.bench_seed,
        },
        "slo": {"ttft_ms": ns.slo_ttft_ms, "tpot_ms": ns.slo_tpot_ms},
        "points": points,
    }
    if not ns.no_save:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        png = os.path.join(repo_root(), "benchmarks", "plots", f"serve-{stamp}.png")
        plot(points, mode, f"fapool bench serve: {model} on {result['env']['device']}", png)
        result["plot"] = os.path.relpath(png, repo_root())
        best = max(points, key=lambda p: p["output_tokens_per_s"])
        summary = (
            f"{model}, {mode} {','.join(str(p['load']) for p in points)}: up to "
            f"{best['output_tokens_per_s']:.1f} out tok/s, TTFT p50 {_ms(best['ttft_s']['p50'])}, "
            f"TPOT p50 {_ms(best['tpot_s']['p50'])}"
        )
        path = write_result("serve", result, summary)
        console.print(f"wrote {path} and {png}")
    return result


def _guess_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms"


def _print_point(mode: str, p: dict[str, Any]) -> None:
    t = Table(
        title=f"{mode} = {p['load']}: {p['completed']}/{p['num_requests']} ok, "
        f"{p['rejected_429']} rejected, {p['failed']} failed, {p['preemptions']:.0f} preemptions"
    )
    for col in ("metric", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        t.add_row(key[:-2].upper(), *(_ms(p[key][q]) for q in ("mean", "p50", "p90", "p99")))
    console.print(t)
    console.print(
        f"throughput {p['request_throughput']:.2f} req/s, {p['output_tokens_per_s']:.1f} out tok/s, "
        f"goodput {p['goodput_requests_per_s']:.2f} req/s ({p['goodput_fraction'] * 100:.0f}% in SLO)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load an OpenAI-compatible server (started here, or --base-url)")
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("load")
    g.add_argument("--base-url", default=None, help="an already running server on this machine")
    g.add_argument("--api-key", default=None)
    g.add_argument("--request-rate", default=None, help="Poisson rates to sweep, req/s, e.g. 0.5,1,2,inf")
    g.add_argument(
        "--max-concurrency",
        default=None,
        help="concurrency levels to sweep (closed loop), or a cap when --request-rate is given",
    )
    g.add_argument("--num-prompts", type=int, default=32, help="requests per load point")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--len-dist", default="fixed", choices=["fixed", "uniform", "exponential"])
    g.add_argument("--range-ratio", type=float, default=0.5, help="uniform lengths in mean*(1 +- ratio)")
    g.add_argument(
        "--trace", default=None, help="Azure-format CSV: TIMESTAMP, ContextTokens, GeneratedTokens"
    )
    g.add_argument("--trace-time-scale", default="1", help="speed-ups of the trace's clock to sweep")
    g.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    g.add_argument("--slo-tpot-ms", type=float, default=200.0)
    g.add_argument("--max-waiting", type=int, default=4096, help="the self-started server's waiting bound")
    g.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server")
    g.add_argument("--warmup-prompts", type=int, default=16, help="requests sent before measuring")
    g.add_argument("--bench-seed", type=int, default=0)
    g.add_argument("--no-save", action="store_true", help="do not write benchmarks/results or plots")
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
