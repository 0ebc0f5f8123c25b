"""Where benchmark figures go: a JSON file per run under benchmarks/results/ with the device,
date, commit and shapes, and one line per run appended to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from typing import Any

import torch


def repo_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(here))


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """HEAD of this checkout; FAPOOL_COMMIT overrides it (the device tool runs a copy of the
    working tree whose .git can lag behind the commit that was sent)."""
    if os.environ.get("FAPOOL_COMMIT"):
        return os.environ["FAPOOL_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo_root(), check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_result(kind: str, payload: dict[str, Any], summary: str, out_dir: str | None = None) -> str:
    """Write benchmarks/results/<kind>-<timestamp>.json and append `summary` to RESULTS.md."""
    root = repo_root()
    out_dir = out_dir or os.path.join(root, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = os.path.join(out_dir, f"{kind}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    md = os.path.join(os.path.dirname(out_dir), "RESULTS.md")
    if os.path.isdir(os.path.dirname(md)):
        env = payload.get("env", {})
        line = f"| {env.get('date', '')[:10]} | {env.get('commit', '')} | {env.get('device', '')} | {kind} | {summary} | `{os.path.relpath(path, os.path.dirname(md))}` |\n"
        new = not os.path.exists(md)
        with open(md, "a") as f:
            if new:
                f.write("# Benchmark results\n\n| date | commit | device | bench | summary | file |\n|---|---|---|---|---|---|\n")
            f.write(line)
    return path
