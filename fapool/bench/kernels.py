"""`fapool bench kernels`: the attention kernel benchmark (benchmarks/bench_attention_kernels.py)
from the command line. The script stays the one home of that benchmark (kernel, launcher,
reference, test and benchmark live side by side, STYLE.md); this only finds and runs it."""

from __future__ import annotations

import argparse
import importlib.util
import os

from fapool.bench.results import repo_root

SCRIPT = os.path.join("benchmarks", "bench_attention_kernels.py")


def load_script():
    path = os.path.join(repo_root(), SCRIPT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{SCRIPT} not found under {repo_root()}: run from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_attention_kernels", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _argv(ns: argparse.Namespace) -> list[str]:
    argv = [
        f"--{flag}"
        for flag in ("sweep", "fp8-sweep", "skip-decode", "skip-prefill", "no-save")
        if getattr(ns, flag.replace("-", "_"))
    ]
    for flag in ("out-dir", "plot", "decode-shapes"):
        value = getattr(ns, flag.replace("-", "_"))
        if value is not None:
            argv += [f"--{flag}", value]
    return argv


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="Triton attention kernels vs SDPA and the copy bandwidth (GPU)")
    p.add_argument("--sweep", action="store_true", help="also sweep tile/warp/stage/split settings")
    p.add_argument("--fp8-sweep", action="store_true", help="sweep the FP8-cache decode's tile/warp/stage settings")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--decode-shapes", default=None, help="BxL,... decode shapes (default: all)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results; plots beside)")
    p.add_argument("--plot", default=None, help="only redraw the plot from a results JSON (no GPU)")
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=lambda ns: (load_script().main(_argv(ns)), 0)[1])
