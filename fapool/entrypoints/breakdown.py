"""Where the time went across workers (seed 000's headline metrics: utilisation and
communication share), summarised from the driver's StepReports."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table

from fapool.worker.protocol import RankReport, StepReport


def _totals(per_step: list[dict[int, RankReport]], total_s: float) -> dict[int, dict[str, float]]:
    """Each rank's RankReports summed over a run, with its utilisation (compute over the
    driver's wall time) and communication share."""
    out: dict[int, dict[str, float]] = {}
    for reports in per_step:
        for r, rep in reports.items():
            acc = out.setdefault(
                r, {"compute_s": 0.0, "comm_s": 0.0, "idle_s": 0.0, "tokens": 0, "q_rows": 0, "role": rep.role}
            )
            acc["compute_s"] += rep.compute_s
            acc["comm_s"] += rep.comm_s
            acc["idle_s"] += rep.idle_s
            acc["tokens"] += rep.num_tokens
            acc["q_rows"] += rep.q_rows
    for acc in out.values():
        acc["utilisation"] = acc["compute_s"] / total_s if total_s else 0.0
        acc["comm_share"] = acc["comm_s"] / total_s if total_s else 0.0
    return out


def summarize_ranks(step_stats: list[StepReport]) -> dict[int, dict[str, float]]:
    """Per dense rank over a run: compute, communication and idle seconds, utilisation."""
    return _totals([s.ranks for s in step_stats], sum(s.total_s for s in step_stats))


def summarize(step_stats: list[StepReport]) -> dict[str, Any] | None:
    """Totals over all steps of a pool run, or None when the runner keeps no breakdown."""
    if not step_stats:
        return None
    total = sum(s.total_s for s in step_stats)
    workers = _totals([s.workers for s in step_stats], total)
    for acc in workers.values():
        acc["attention_s"] = acc.pop("compute_s")  # an attention rank computes attention only
        # Outside a step's message exchange a worker waits for the next step: idle too.
        acc["idle_s"] = max(0.0, total - acc["attention_s"] - acc["comm_s"])
    overlaps = [s.overlap for s in step_stats if s.overlap is not None]
    kv_peak: dict[int, int] = {}
    for s in step_stats:
        for w, n in s.kv_tokens_per_worker.items():
            kv_peak[w] = max(kv_peak.get(w, 0), n)
    ranks = summarize_ranks(step_stats) if any(s.ranks for s in step_stats) else None
    dense = sum(s.dense_s for s in step_stats)
    local = sum(s.local_attention_s for s in step_stats)
    # The driver's communication: waiting for attention workers, and (tensor parallel with a
    # pool) all-reduces and exchanges with the other dense ranks.
    wait = sum(s.wait_s + s.tp_comm_s for s in step_stats)
    return {
        "steps": len(step_stats),
        "total_s": total,
        "driver": {
            "dense_s": dense,
            "local_attention_s": local,
            "wait_s": wait,
            "utilisation": (dense + local) / total if total else 0.0,
            "comm_share": wait / total if total else 0.0,
        },
        "workers": workers,
        "overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
        "pool_size": {
            "min": min(s.pool_size for s in step_stats),
            "max": max(s.pool_size for s in step_stats),
            "timeline": [s.pool_size for s in step_stats],
        },
        "kv_tokens_peak_per_worker": kv_peak,
        "micro_batches": dict(Counter(s.num_micro_batches for s in step_stats)),  # count -> steps
        "plan_ms_per_step": 1e3 * sum(s.plan_s for s in step_stats) / len(step_stats),
        "dense_ranks": ranks,
    }


def breakdown_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"per-worker time over {summary['steps']} steps ({summary['total_s']:.2f} s)")
    for col in ("worker", "compute (s)", "attention (s)", "comm / wait (s)", "idle (s)", "utilisation", "peak KV tokens"):
        t.add_column(col, justify="right")
    d = summary["driver"]
    ranks = summary.get("dense_ranks") or {}
    t.add_row(f"driver ({ranks.get(0, {}).get('role', 'dense')})", f"{d['dense_s']:.3f}", f"{d['local_attention_s']:.3f}", f"{d['wait_s']:.3f}", "-",
              f"{d['utilisation']:.0%}", "-")
    for r, acc in sorted(ranks.items()):
        if r:
            t.add_row(f"{acc.get('role', 'dense')} rank {r}", f"{acc['compute_s']:.3f}", "-", f"{acc['comm_s']:.3f}", f"{acc['idle_s']:.3f}",
                      f"{acc['utilisation']:.0%}", "-")
    for w, acc in sorted(summary["workers"].items()):
        t.add_row(f"attention {w}", "-", f"{acc['attention_s']:.3f}", f"{acc['comm_s']:.3f}", f"{acc['idle_s']:.3f}",
                  f"{acc['utilisation']:.0%}", str(summary["kv_tokens_peak_per_worker"].get(w, 0)))
    ov = summary["overlap_mean"]
    t.caption = (
        f"driver communication share {d['comm_share']:.0%}; attention overlap {ov:.0%}" if ov is not None
        else f"driver communication share {d['comm_share']:.0%}"
    )
    if summary["workers"]:
        t.caption += f"; pool size {summary['pool_size']['min']}..{summary['pool_size']['max']}"
    return t
