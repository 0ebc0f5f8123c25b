"""Seed 004 (Lamina: attention offloaded to other devices) at equal cost, SIMULATED.

For each model shape (Llama-3-8B, Llama-3.1-70B), GPU preset (h100, h200) and workload (the
Azure LLM inference traces 2023 conv and code, and Kimi's conversation trace from Mooncake's
FAST'25 release) it runs the discrete-event simulator, decode only (`prefill="skip"`: prompts
arrive prefilled, as in Lamina's decode cluster), with a closed loop of `--concurrency` clients
that take the trace's (prompt, output) lengths in trace order, and reports saturated decode
throughput (output tokens/s between `--warmup` and `--duration` simulated seconds) and TPOT for:

  static        every TP x replicas split of the GPUs (PP 1)
  head-parallel Lamina's topology: dense TP d + (GPUs - d) attention GPUs holding all KV, split
                by KV head (the simulator's head_parallel)
  lamina-request the same topology with request-level attention parallelism: each sequence's
                KV whole on one attention GPU (FAPool, threshold 0, shard mode, one segment a sequence)
  fapool        base TP d + the rest as pool GPUs, threshold `--threshold`
  afd           r attention GPUs + an FFN instance of TP f (seed 002, for reference)

Every layout uses the same number of GPUs of one kind, so equal GPU count is equal cost
($/GPU-hour from the preset). The simulator has no heterogeneous instance (Lamina's H20
attention GPUs beside H100s are not modelled); the tokens/s per $/hour column compares H100
with H200 at equal cost. The seed's figure is its stated range (16.1-90.1% more throughput than
homogeneous solutions at similar hardware cost); it gives no per-workload numbers.

    PYTHONPATH=. .venv/bin/python benchmarks/seed004_table.py --azure-conv AzureLLMInferenceTrace_conv.csv \
        --azure-code AzureLLMInferenceTrace_code.csv --kimi conversation_trace.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, write_result
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import get_hardware
from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import AFD, FAPool, StaticTPPP, Strategy, head_parallel
from fapool.sim.workload import RequestBatch, Workload, load_azure_trace

CONFIGS = Path(__file__).parent / "configs"
MODELS = {"Llama-3-8B": CONFIGS / "llama3_8b.json", "Llama-3.1-70B": CONFIGS / "llama3_70b.json"}
SEED_CLAIM = "+16.1% to +90.1% throughput vs homogeneous GPUs at similar hardware cost (H100 + H20)"
FAMILIES = ("static", "head-parallel", "lamina-request", "fapool", "afd")
LAMINA = ("head-parallel", "lamina-request")


class TraceLoop(Workload):
    """A closed loop of `concurrency` clients; request i has the trace's i-th (prompt,
    output) lengths (cycling), so every strategy sees the same requests in the same order."""

    closed_loop = True

    def __init__(self, prompts: np.ndarray, outputs: np.ndarray, concurrency: int, name: str) -> None:
        self.prompts, self.outputs = prompts, np.maximum(outputs, 1)
        self.concurrency, self.name = concurrency, name
        self.num_requests = 1 << 30  # the run stops at max_sim_time
        self._next = 0

    def _take(self) -> tuple[int, int]:
        i = self._next % len(self.prompts)
        self._next += 1
        return int(self.prompts[i]), int(self.outputs[i])

    def initial(self) -> RequestBatch:
        self._next = 0
        c = self.concurrency
        rows = [self._take() for _ in range(c)]
        prompt, output = (np.array(v, np.int64) for v in zip(*rows, strict=True))
        return RequestBatch(np.zeros(c), prompt, output, np.zeros(c, np.int64), np.arange(c))

    def replenish(self, client: int, now: float) -> tuple[int, int] | None:
        return self._take()

    def length_sample(self, n: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        return self.prompts, self.outputs

    def describe(self) -> str:
        return f"{self.name}, closed loop of {self.concurrency}"


def load_kimi(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Mooncake's JSONL trace: input_length, output_length per line."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return (
        np.array([r["input_length"] for r in rows], np.int64),
        np.array([r["output_length"] for r in rows], np.int64),
    )


def layouts(gpus: int, max_batch: int, threshold: int) -> list[Strategy]:
    """Every layout of each family on `gpus` GPUs (validated against the model later)."""
    out: list[Strategy] = []
    for tp in (1, 2, 4, 8):
        if gpus % tp == 0:
            out.append(StaticTPPP(tp=tp, pp=1, replicas=gpus // tp, max_batch=max_batch))
    for d in (1, 2, 4):
        if 1 <= gpus - d <= 8:  # head placement: at most one attention GPU per KV head
            out.append(head_parallel(dense_tp=d, attn_workers=gpus - d, max_batch=max_batch))
    for d in (1, 2, 4):  # Lamina's request-level attention parallelism: each sequence on one GPU
        out.append(
            FAPool(
                base_tp=d,
                pool_size=gpus - d,
                threshold=0,
                tokens_per_worker=1 << 30,
                max_batch=max_batch,
                name="lamina-request",
            )
        )
    for d in (1, 2, 4):
        out.append(
            FAPool(
                base_tp=d,
                pool_size=gpus - d,
                threshold=threshold,
                tokens_per_worker=threshold,
                max_batch=max_batch,
            )
        )
    for f in (1, 2, 4):
        if gpus - f >= 1:
            out.append(AFD(r=gpus - f, f_tp=f, max_batch_per_attn=max(1, max_batch // (gpus - f))))
    return out


def family(s: Strategy) -> str:
    return s.name if s.name in FAMILIES else "static"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--azure-conv", required=True)
    ap.add_argument("--azure-code", required=True)
    ap.add_argument("--kimi", required=True, help="Mooncake FAST25-release/traces/conversation_trace.jsonl")
    ap.add_argument("--hardware", nargs="+", default=["h100", "h200"])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=1024)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--threshold", type=int, default=2048, help="FA Pool threshold and tokens per worker")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=80.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    conv, code = load_azure_trace(args.azure_conv), load_azure_trace(args.azure_code)
    workloads = {
        "Azure conv 2023": (conv.prompt_len, conv.output_len),
        "Azure code 2023": (code.prompt_len, code.output_len),
        "Kimi conversation": load_kimi(args.kimi),
    }
    config = SimConfig(prefill="skip", warmup=args.warmup, max_sim_time=args.duration)
    runs, table_rows = [], []
    for model_name in args.models:
        for hw_name in args.hardware:
            cost = CostModel(load_model_config(str(MODELS[model_name])), get_hardware(hw_name))
            for wl_name, (prompts, outputs) in workloads.items():
                best: dict[str, dict] = {}
                for s in layouts(args.gpus, args.max_batch, args.threshold):
                    try:
                        s.validate(cost)
                    except SimInputError as exc:
                        runs.append(
                            {
                                "model": model_name,
                                "hardware": hw_name,
                                "workload": wl_name,
                                "layout": s.describe(),
                                "skipped": str(exc),
                            }
                        )
                        continue
                    t0 = time.perf_counter()
                    res = simulate(s, cost, TraceLoop(prompts, outputs, args.concurrency, wl_name), config)
                    run = {
                        "model": model_name,
                        "hardware": hw_name,
                        "workload": wl_name,
                        "family": family(s),
                        "layout": s.describe(),
                        "gpus": s.total_gpus(),
                        "usd_per_hour": s.total_gpus() * cost.hw.cost_per_hour,
                        "throughput_tok_s": res.throughput,
                        "tpot_p50_ms": 1e3 * float(np.median(res.tpot)),
                        "tpot_p90_ms": 1e3 * float(np.percentile(res.tpot, 90)),
                        "preemptions": res.preemptions,
                        "wall_s": time.perf_counter() - t0,
                    }
                    runs.append(run)
                    f = run["family"]
                    if f not in best or run["throughput_tok_s"] > best[f]["throughput_tok_s"]:
                        best[f] = run
                    print(
                        f"{model_name} {hw_name} {wl_name}: {run['layout']}: {run['throughput_tok_s']:.0f} tok/s, "
                        f"TPOT p50 {run['tpot_p50_ms']:.1f} ms ({run['wall_s']:.1f} s)",
                        flush=True,
                    )
                lamina = [best[f] for f in LAMINA if f in best]
                best_lamina = max(lamina, key=lambda r: r["throughput_tok_s"]) if lamina else None
                row = {
                    "model": model_name,
                    "hardware": hw_name,
                    "workload": wl_name,
                    "usd_per_hour": args.gpus * cost.hw.cost_per_hour,
                    "best": best,
                    "lamina_vs_static": best_lamina["throughput_tok_s"] / best["static"]["throughput_tok_s"]
                    - 1
                    if best_lamina
                    else None,
                    "best_lamina": best_lamina,
                }
                table_rows.append(row)

    t = Table(
        title=f"SIMULATED: seed 004 at equal cost ({args.gpus} GPUs of one kind, decode only, "
        f"closed loop of {args.concurrency})"
    )
    for col in (
        "model",
        "GPUs",
        "$/h",
        "workload",
        "static tok/s (layout)",
        "Lamina by KV head",
        "Lamina by request",
        "FA Pool",
        "AFD",
        "best Lamina vs static",
        "tok/s per $/h: static / Lamina",
        "seed 004 claims",
    ):
        t.add_column(col)
    for r in table_rows:
        b = r["best"]

        def cell(f: str, b: dict = b) -> str:
            if f not in b:
                return "does not fit"
            layout = b[f]["layout"].split(" (")[0].split(", threshold 0")[0].split(", overlap")[0]
            return f"{b[f]['throughput_tok_s']:,.0f} ({layout}; p50 {b[f]['tpot_p50_ms']:.0f} ms)"

        lam = r["best_lamina"]
        per_usd = f"{b['static']['throughput_tok_s'] / r['usd_per_hour']:,.0f} / " + (
            f"{lam['throughput_tok_s'] / r['usd_per_hour']:,.0f}" if lam else "-"
        )
        hv = r["lamina_vs_static"]
        t.add_row(
            f"SIMULATED {r['model']}",
            f"{args.gpus}x {r['hardware']}",
            f"{r['usd_per_hour']:.2f}",
            r["workload"],
            cell("static"),
            cell("head-parallel"),
            cell("lamina-request"),
            cell("fapool"),
            cell("afd"),
            f"{hv:+.1%}" if hv is not None else "-",
            per_usd,
            SEED_CLAIM,
        )
    Console(width=260).print(t)
    if args.no_write:
        return
    env = environment("cpu")
    env["device"] = f"SIMULATED h100/h200 presets (computed on {env['device']})"
    traces = {
        name: {"path": p, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
        for name, p in (
            ("Azure conv 2023", args.azure_conv),
            ("Azure code 2023", args.azure_code),
            ("Kimi conversation", args.kimi),
        )
    }
    payload = {
        "env": env,
        "label": "SIMULATED",
        "seed_claim": SEED_CLAIM,
        "args": vars(args),
        "traces": traces,
        "models": {k: str(v.name) for k, v in MODELS.items()},
        "hardware": {
            h: {
                "cost_per_hour": get_hardware(h).cost_per_hour,
                "memory_bytes": get_hardware(h).memory_bytes,
                "attn_bandwidth": get_hardware(h).attn_bandwidth,
            }
            for h in args.hardware
        },
        "rows": table_rows,
        "runs": runs,
    }
    summary = (
        f"SIMULATED seed 004 at equal GPU count, closed loop of {args.concurrency:,}: best Lamina topology (attention GPUs hold all KV, by KV head "
        "or by request) vs best static, "
        + "; ".join(
            f"{r['model']} {r['hardware']} {r['workload']} {r['lamina_vs_static']:+.0%}"
            for r in table_rows
            if r["lamina_vs_static"] is not None
        )
        + f" (seed: {SEED_CLAIM})"
    )
    print(f"wrote {write_result('seed004_table', payload, summary)}")


if __name__ == "__main__":
    main()
