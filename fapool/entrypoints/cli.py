"""`fapool` command line: generate, bench, and the planner/simulator commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.console import Console

from fapool.config import ConfigError
from fapool.engine.arg_utils import EngineArgs
from fapool.sampling_params import SamplingParams

console = Console(stderr=True)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default: %(default)s: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default: %(default)s)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop at this token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    g.add_argument("-n", "--n", type=int, default=1, help="completions per prompt (default: %(default)s)")
    g.add_argument("--logprobs", type=int, default=None, help="report this many top alternatives per token")


def _sampling_params(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=ns.n,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        min_p=ns.min_p,
        seed=ns.sampling_seed,
        max_tokens=ns.max_tokens,
        stop=tuple(ns.stop),
        stop_token_ids=tuple(ns.stop_token_id),
        ignore_eos=ns.ignore_eos,
        logprobs=ns.logprobs,
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    from fapool.entrypoints.llm import LLM

    params = _sampling_params(ns)
    prompts: list = list(ns.prompt)
    if ns.prompt_file:
        with open(ns.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts and not ns.chat:
        console.print("[red]error:[/] give --prompt, --prompt-file or --chat")
        return 2
    with console.status("loading model"):
        llm = LLM(**vars(EngineArgs.from_cli(ns)))
    out_console = Console()
    # One completion to a terminal streams as it is generated; several, or --json, print at the end.
    stream = _Stream(out_console) if not ns.json and params.n == 1 and (ns.chat or len(prompts) == 1) else None
    if stream:
        out_console.rule(f"[bold]{(ns.chat or prompts[0])[:70]}")
    if ns.chat:
        outputs = llm.chat([{"role": "user", "content": ns.chat}], params, errors="return", on_output=stream)
        prompts = [ns.chat]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1, errors="return", on_output=stream)
    breakdown = None
    stats = llm.engine.executor.reports
    if stats:
        from fapool.entrypoints.breakdown import breakdown_table, summarize

        breakdown = summarize(stats)
    llm.shutdown()
    records = []
    for prompt, out in zip(prompts, outputs):
        n_tokens = sum(len(c.token_ids) for c in out.outputs)
        elapsed = (out.metrics.finished_time or 0) - out.metrics.arrival_time
        rec = {
            "prompt": prompt,
            "completions": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in out.outputs
            ],
            "error": out.error,
            "ttft_s": out.ttft,
            "tpot_s": out.tpot,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else None,
        }
        records.append(rec)
    if ns.json:
        payload = records if len(records) > 1 else records[0]
        if breakdown is not None:
            payload = {"outputs": records, "breakdown": breakdown}
        print(json.dumps(payload, indent=2))
        return 0 if all(r["error"] is None for r in records) else 1
    for rec in records:
        if not stream:
            out_console.rule(f"[bold]{rec['prompt'][:70]}")
        if rec["error"]:
            out_console.print(f"[red]error:[/] {rec['error']}")
            continue
        for c in rec["completions"]:
            if not stream:
                out_console.print(c["text"], markup=False, highlight=False)
            out_console.print(f"[dim](finish: {c['finish_reason']}, {len(c['token_ids'])} tokens)")
        fmt = lambda v, scale, unit: f"{v * scale:.1f} {unit}" if v is not None else "-"  # noqa: E731
        out_console.print(
            f"TTFT {fmt(rec['ttft_s'], 1e3, 'ms')} | TPOT {fmt(rec['tpot_s'], 1e3, 'ms')} | "
            f"{fmt(rec['tokens_per_s'], 1, 'tokens/s')}"
        )
    if breakdown is not None:
        out_console.print(breakdown_table(breakdown))
    return 0 if all(r["error"] is None for r in records) else 1


class _Stream:
    """Prints a single completion's new text as each step produces it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.printed = 0

    def __call__(self, out) -> None:
        if not out.outputs:
            return
        text = out.outputs[0].text
        if len(text) > self.printed:
            self.console.file.write(text[self.printed :])
            self.console.file.flush()
            self.printed = len(text)
        if out.finished:
            self.console.file.write("\n")


def _needs_extra(extra: str, missing: str | None) -> int:
    console.print(f"[red]error:[/] this command needs {missing}; install it with pip install 'fapool[{extra}]'")
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fapool", description="fapool LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", help="one prompt per line")
    gen.add_argument("--chat", help="a user message, formatted with the model's chat template")
    gen.add_argument("--json", action="store_true", help="print JSON")
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks (results go to benchmarks/results)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from fapool.bench import engine_bench

    engine_bench.add_parser(bench_sub)
    from fapool.bench import pool_bench

    pool_bench.add_parser(bench_sub)
    from fapool.bench import serve_bench

    serve_bench.add_parser(bench_sub)
    try:
        from fapool.entrypoints.server import register_serve
    except ImportError as e:  # the [serve] extra (fastapi, uvicorn) is not installed here
        missing = e.name
        serve = sub.add_parser("serve", help=f"OpenAI-compatible server (needs {missing}: pip install 'fapool[serve]')")
        serve.set_defaults(func=lambda ns: _needs_extra("serve", missing))
    else:
        register_serve(sub)

    from fapool.sim import cli as sim_cli

    sim_cli.register(sub)
    from fapool.sparse import cli as sparse_cli

    sparse_cli.register(sub)
    return parser


def _run_as_torchrun_worker() -> int | None:
    """Under torchrun, every rank runs this same command; ranks other than 0 serve as
    workers (their role comes from the driver) and never parse the command line."""
    from fapool.worker.comm import env_rank

    launched = env_rank()
    if launched is None or launched[0] == 0 or launched[1] < 2:
        return None
    from fapool.engine.arg_utils import default_device
    from fapool.worker.comm import engine_rank_devices
    from fapool.worker.dense_worker import GROUP_TIMEOUT_S
    from fapool.worker.launcher import rank_main

    # The driver decides the same way (WorkerGroup): NCCL with this rank on cuda:LOCAL_RANK
    # when the host has a GPU per local rank, else gloo.
    rank, world = launched
    ranks = engine_rank_devices(default_device(), world)
    rank_main(rank, world, "env://", ranks.backend, ranks.devices[rank], GROUP_TIMEOUT_S)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _run_as_torchrun_worker()
    if code is not None:
        return code
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING)
    try:
        return ns.func(ns)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
