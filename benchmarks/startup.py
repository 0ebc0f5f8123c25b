"""Start-up of the embedded default model on a CPU, as a new user meets it (issue 21):
`LLM()` wall time and peak memory in a fresh process, and the time from typing `make run`
to its first streamed token.

    PYTHONPATH=. python benchmarks/startup.py [--runs 3] [--quantization int4] [--no-save]

Each figure is the median of `--runs` fresh processes; `.venv` must exist (make venv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fapool.bench.results import environment, repo_root, write_result

_LLM_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from fapool import LLM
t1 = time.perf_counter()
LLM(quantization=sys.argv[1] or None)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"import_s": t1 - t0, "llm_s": t2 - t1, "peak_rss_mb": peak}))
"""


def llm_start(python: str, quantization: str) -> dict[str, float]:
    out = subprocess.run(
        [python, "-c", _LLM_PROBE, quantization], capture_output=True, text=True, check=True, cwd=repo_root()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_run_first_token() -> dict[str, float]:
    """Seconds from starting `make run` to the first byte of the answer (the first output after
    the prompt's title rule), and to its exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], stdout=subprocess.PIPE, cwd=repo_root())
    assert proc.stdout is not None
    seen_title, first = False, None
    line = b""
    while True:
        byte = proc.stdout.read(1)
        if not byte:
            break
        if seen_title and first is None and not byte.isspace():
            first = time.perf_counter() - t0
        line += byte
        if byte == b"\n":
            seen_title = seen_title or "─" in line.decode("utf-8", "replace")
            line = b""
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"make run failed (exit {proc.returncode}) or printed no answer")
    return {"first_token_s": first, "total_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quantization", default="int4", help="for LLM(); '' for float32")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    python = os.path.join(repo_root(), ".venv", "bin", "python")
    llm = [llm_start(python, args.quantization) for _ in range(args.runs)]
    make = [make_run_first_token() for _ in range(args.runs)]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    payload = {
        "env": environment("cpu"),
        "load_avg": os.getloadavg(),
        "quantization": args.quantization or None,
        "llm_runs": llm,
        "make_run_runs": make,
        "llm_s": med(llm, "llm_s"),
        "import_s": med(llm, "import_s"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in llm),
        "make_run_first_token_s": med(make, "first_token_s"),
        "make_run_total_s": med(make, "total_s"),
    }
    summary = (
        f"embedded SmolLM2 start-up, median of {args.runs} fresh processes: `LLM(quantization="
        f"{args.quantization or None!r})` {payload['llm_s']:.2f} s (after {payload['import_s']:.2f} s of imports), "
        f"peak RSS {payload['peak_rss_mb']:.0f} MB; `make run` first streamed token "
        f"{payload['make_run_first_token_s']:.2f} s, whole command {payload['make_run_total_s']:.2f} s"
    )
    print(summary)
    if not args.no_save:
        print("wrote", write_result("startup", payload, summary))


if __name__ == "__main__":
    sys.exit(main())
