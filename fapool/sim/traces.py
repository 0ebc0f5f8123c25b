"""Azure LLM inference trace CSVs (TIMESTAMP, ContextTokens, GeneratedTokens).

TIMESTAMP is seconds or a datetime (seven fractional digits are cut to six); arrivals are made
relative to the first row and sorted; GeneratedTokens == 0 counts as one token.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from fapool.sim.errors import SimInputError

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Trace:
    arrival: np.ndarray  # float64 seconds from the first request, non-decreasing
    prompt_len: np.ndarray  # int64
    output_len: np.ndarray  # int64, >= 1

    def __len__(self) -> int:
        return len(self.arrival)


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if "." in text:  # trim fractional seconds to the microseconds datetime accepts
        head, frac = text.rsplit(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        text = f"{head}.{digits[:6]}" + frac[len(digits) :]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ValueError(f"TIMESTAMP {text!r} is neither seconds nor a datetime") from exc


def load_azure_trace(path: str | Path, limit: int | None = None) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"trace file not found: {path}")
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SimInputError(f"{path}: empty trace")
        names = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise SimInputError(
                f"{path}: header lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}"
            )
        idx = [names.index(c) for c in COLUMNS]
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if limit is not None and len(times) >= limit:
                break
            try:
                if len(row) < len(names):
                    raise ValueError(f"{len(row)} fields, header has {len(names)}")
                t = _parse_time(row[idx[0]])
                p, g = int(row[idx[1]].strip()), int(row[idx[2]].strip())
                if p < 1 or g < 0:
                    raise ValueError(f"ContextTokens must be >= 1 and GeneratedTokens >= 0, got {p}, {g}")
            except ValueError as exc:
                raise SimInputError(f"{path}:{lineno}: malformed trace row {row!r}: {exc}") from exc
            times.append(t)
            prompts.append(p)
            outputs.append(max(1, g))
    if not times:
        raise SimInputError(f"{path}: no requests in trace")
    arrival = np.asarray(times, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - arrival[order][0]
    return Trace(arrival, np.asarray(prompts, np.int64)[order], np.asarray(outputs, np.int64)[order])


def write_azure_trace(path: str | Path, arrival, prompt_len, output_len) -> None:
    """Write a trace in the same format (seconds timestamps); used by tests and examples."""
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for t, p, g in zip(arrival, prompt_len, output_len, strict=True):
            w.writerow([f"{float(t):.6f}", int(p), int(g)])
