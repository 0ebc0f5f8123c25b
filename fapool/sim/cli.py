"""The simulator's `fapool` subcommands `plan`, `simulate`, `calibrate` (`register` adds them; `fapool`'s
main turns bad input, SimInputError, into one line and exit code 2)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fapool.sim.errors import SimInputError
from fapool.sim.workload import (
    DEFAULT_OUTPUT,
    DEFAULT_PROMPT,
    ClosedLoopWorkload,
    LengthDist,
    PoissonWorkload,
    TraceWorkload,
    load_azure_trace,
)

STRATEGIES = ("static", "fapool", "afd", "head")


def _cost(args):
    from fapool.sim.calibrate import apply_calibration, load_calibration
    from fapool.sim.cost_model import CostModel, load_model_config
    from fapool.sim.hardware import get_hardware

    model = load_model_config(args.model)
    hw = get_hardware(args.hardware)
    if args.calibration:
        hw = apply_calibration(hw, load_calibration(args.calibration))
    return CostModel(model, hw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="seed000", help="preset name (seed000) or path to a HF config.json")
    p.add_argument("--hardware", default="h100", help="h100, h200 or cpu")
    p.add_argument("--calibration", help="JSON written by `fapool calibrate` (replaces the preset's rates)")
    p.add_argument("--seed", type=int, default=0)


def _workload_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("workload (default: built-in synthetic Poisson stream)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="prompt length distribution, e.g. lognormal:4096,1.0")
    g.add_argument("--output", default=DEFAULT_OUTPUT, help="output length distribution, e.g. exp:256")
    g.add_argument("--max-len", type=int, default=32768, help="clip sampled lengths to this")
    g.add_argument("--trace", help="Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    return g


def _lengths(args):
    return LengthDist.parse(args.prompt, hi=args.max_len), LengthDist.parse(args.output, hi=args.max_len)


def _workload(args):
    if args.trace:
        if args.speedup <= 0:
            raise SimInputError("--speedup must be > 0")
        return TraceWorkload(load_azure_trace(args.trace), args.speedup, Path(args.trace).name)
    prompt, output = _lengths(args)
    if args.concurrency:
        n = max(args.num_requests, args.concurrency)
        return ClosedLoopWorkload(prompt, output, args.concurrency, n, seed=args.seed)
    rate = math.inf if str(args.rate).lower() in ("inf", "burst") else float(args.rate)
    return PoissonWorkload(prompt, output, rate, args.num_requests, args.seed)


def _strategies(args) -> list:
    from fapool.sim.strategies import AFD, FAPool, StaticTPPP, head_parallel

    ov, rep, mb = not args.no_overlap, args.replicas, args.max_batch
    make = {
        "static": lambda: StaticTPPP(tp=args.tp, pp=args.pp, replicas=rep, max_batch=mb),
        "fapool": lambda: FAPool(base_tp=args.base_tp, pool_size=args.pool_size, threshold=args.threshold,
                                 tokens_per_worker=args.tokens_per_worker, mode=args.pool_mode, overlap=ov,
                                 replicas=rep, max_batch=mb),
        "afd": lambda: AFD(r=args.afd_r, f_tp=args.afd_f_tp, max_batch_per_attn=args.afd_batch, overlap=ov,
                           replicas=rep),
        "head": lambda: head_parallel(dense_tp=args.base_tp, attn_workers=args.attn_workers, overlap=ov,
                                      replicas=rep, max_batch=mb),
    }
    out = []
    for name in [s.strip() for s in args.strategy.split(",") if s.strip()]:
        if name not in make:
            raise SimInputError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        out.append(make[name]())
    if not out:
        raise SimInputError("no strategy given")
    return out


def _console():
    from rich.console import Console

    # Piped output gets a width that fits the tables instead of rich's 80-column default.
    return Console() if sys.stdout.isatty() else Console(width=220)


def _write_json(console, path: str, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"wrote {path}")


def cmd_simulate(args) -> int:
    from fapool.sim.results import results_table
    from fapool.sim.simulator import SimConfig, simulate

    cost = _cost(args)
    strategies = _strategies(args)
    config = SimConfig(prefill=args.prefill, max_num_batched_tokens=args.max_batched_tokens, warmup=args.warmup,
                       progress=not args.no_progress)
    # A fresh workload for each strategy: the same requests.
    results = [simulate(s, cost, _workload(args), config) for s in strategies]
    slo = args.tpot_slo / 1e3 if args.tpot_slo else None
    console = _console()
    console.print(f"[bold]simulated[/bold] {cost.model.architecture} {cost.model.num_hidden_layers} layers "
                  f"on {cost.hw.name} ({cost.hw.source}); workload: {results[0].workload}")
    console.print(results_table(results, "simulated", slo))
    if args.json:
        _write_json(console, args.json, [r.summary(slo) for r in results])
    return 0


def cmd_plan(args) -> int:
    import numpy as np

    from fapool.sim.planner import PlannerInputs, make_plan, plan_table

    cost = _cost(args)
    prompt_d, output_d = _lengths(args)
    if args.trace:
        tr = load_azure_trace(args.trace)
        # Verification draws prompts and outputs from the trace's own lengths (independently).
        prompt_d = LengthDist("choice", tuple(float(x) for x in tr.prompt_len), 1, 1 << 30)
        output_d = LengthDist("choice", tuple(float(x) for x in tr.output_len), 1, 1 << 30)
        prompts, outputs = tr.prompt_len, tr.output_len
    else:
        rng = np.random.default_rng([args.seed, 9])
        prompts, outputs = prompt_d.sample(rng, 100_000), output_d.sample(rng, 100_000)
    if args.tpot_slo <= 0:
        raise SimInputError(f"--tpot-slo must be > 0 ms, got {args.tpot_slo}")
    inp = PlannerInputs(cost, prompts, outputs, args.tpot_slo / 1e3, max_gpus=args.max_gpus,
                        max_batch=args.max_batch, max_batch_per_attn=args.max_batch_per_attn)
    plan = make_plan(inp, prompt_d, output_d, verify_steps=args.verify_steps, seed=args.seed)
    console = _console()
    m = plan.moments
    console.print(f"model {args.model} on {cost.hw.name}; decode context at a random step: mean "
                  f"{m.mean:,.0f}, sd {m.sd:,.0f} tokens (prompt mean {m.mean_prompt:,.0f}, output mean "
                  f"{m.mean_output:,.0f})")
    console.print(plan_table(plan))
    rec = plan.rows[plan.recommended]
    console.print(f"[bold]recommend:[/bold] {rec.strategy.describe()} -- "
                  f"{(rec.sim.throughput_per_gpu if rec.sim else rec.throughput_per_gpu):,.0f} tok/s/GPU at "
                  f"TPOT {rec.tpot * 1e3:.1f} ms (SLO {args.tpot_slo:g} ms)")
    if args.json:
        rows = [{"kind": r.kind, "strategy": r.strategy.describe(), "gpus": r.gpus, "batch": r.batch,
                 "tpot_s": r.tpot, "throughput_per_gpu": r.throughput_per_gpu,
                 "gpu_seconds_per_token": r.gpu_seconds_per_token, "notes": r.notes,
                 "engine_args": r.strategy.engine_args(), "replicas": r.strategy.replicas,
                 "sim": r.sim.summary(plan.tpot_slo) if r.sim else None} for r in plan.rows]
        # engine_args: what `--plan FILE` gives the engine (the recommended row, one instance).
        _write_json(console, args.json, {"tpot_slo_s": plan.tpot_slo, "context_moments": vars(m),
                                         "recommended": plan.recommended,
                                         "engine_args": rec.strategy.engine_args(), "rows": rows})
    return 0


def cmd_calibrate(args) -> int:
    from fapool.bench.calibrate import calibrate
    from fapool.sim.calibrate import summary_lines, write_calibration
    from fapool.sim.cost_model import load_model_config

    cal = calibrate(
        device=args.device, quick=not args.full, collectives=not args.no_collectives, threads=args.threads,
        engine=not args.no_engine, pool=True if args.pool else None,  # None: with --full
        model=load_model_config(args.model) if args.model else None, twin=args.twin,
        progress=None if args.quiet else lambda line: print(line, flush=True),
        checkpoint=lambda partial: write_calibration(partial, args.out),
    )
    write_calibration(cal, args.out)
    print("\n".join(summary_lines(cal)))
    print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate",
                              help="discrete-event simulation of a cluster serving a request stream")
    _common(p)
    g = _workload_args(p)
    g.add_argument("--speedup", type=float, default=1.0, help="replay the trace this many times faster")
    g.add_argument("--rate", default="8", help="Poisson arrivals per second, or 'inf' (all at t=0)")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument("--concurrency", type=int, help="closed loop: keep this many requests in flight")
    s = p.add_argument_group("strategies")
    s.add_argument("--strategy", default="static,fapool", help=f"comma list of {', '.join(STRATEGIES)}")
    for flag, default in (("tp", 8), ("pp", 2), ("base-tp", 8), ("pool-size", 24), ("threshold", 4096),
                          ("tokens-per-worker", 4096), ("afd-r", 8), ("afd-f-tp", 1), ("afd-batch", 64),
                          ("attn-workers", 8), ("replicas", 1), ("max-batch", 256)):
        s.add_argument(f"--{flag}", type=int, default=default)
    s.add_argument("--pool-mode", default="shard", choices=("shard", "replicate", "head"),
                   help="where pool KV lives, as the engine's --pool-mode (placed by its PoolManager)")
    s.add_argument("--no-overlap", action="store_true", help="no micro-batch ping-pong (pool / AFD)")
    r = p.add_argument_group("run")
    r.add_argument("--prefill", default="chunked", choices=("chunked", "skip"))
    r.add_argument("--max-batched-tokens", type=int, default=8192)
    r.add_argument("--warmup", type=float, default=0.0)
    r.add_argument("--tpot-slo", type=float, help="ms; adds an SLO attainment column")
    r.add_argument("--json", help="write the summaries here")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("plan", help="closed-form sizing of TP/PP, FA Pool, head-parallel and AFD")
    _common(p)
    _workload_args(p)
    p.add_argument("--tpot-slo", type=float, default=50.0, help="TPOT SLO in ms")
    p.add_argument("--max-gpus", type=int, default=40, help="GPUs one instance may use")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--max-batch-per-attn", type=int, default=256, help="AFD: sequences per attention GPU")
    p.add_argument("--verify-steps", type=int, default=300,
                   help="simulate each plan this many steps (0: skip)")
    p.add_argument("--json", help="write the plan here")
    p.set_defaults(func=cmd_plan)

    help_ = "time GEMMs, attention, collectives and a tiny engine decode here; write JSON"
    p = subparsers.add_parser("calibrate", help=help_)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--full", action="store_true", help="larger sizes (minutes on CPU)")
    p.add_argument("--no-collectives", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-engine", action="store_true",
                   help="kernels only: skip the tiny-engine decode (no host model)")
    p.add_argument("--model", default=None, help="preset or HF config.json whose architecture the tiny engine "
                   "model copies (default: gated Llama)")
    p.add_argument("--pool", action="store_true", help="CPU: also run the tiny engine with an attention pool "
                   "(~1 min) to fit the pool's per-call and per-layer costs (included in --full)")
    p.add_argument("--twin", choices=("tiny", "model"), default="tiny",
                   help="engine decode on a tiny model with --model's architecture flags, or on --model itself "
                   "cut to depth (CPU: 1, 4 and 8 layers; its own widths: a CPU's per-layer costs depend on "
                   "them)")
    p.add_argument("--quiet", action="store_true", help="no per-point progress lines")
    p.add_argument("--out", default="fapool_calibration.json")
    p.set_defaults(func=cmd_calibrate)
