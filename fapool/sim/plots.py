"""PNG plots of simulation results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fapool.sim.results import SimResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in text.lower())
    return "_".join(filter(None, keep.split("_")))[:60]


def plot_results(results: list[SimResult], outdir: str | Path, prefix: str = "sim") -> list[Path]:
    """Latency CDFs (all runs), and per run: per-GPU utilisation and a batch/step-time timeline."""
    plt = _plt()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for ax, data, name in ((axes[0], r.tpot * 1e3, "TPOT (ms)"), (axes[1], r.ttft, "TTFT (s)")):
            if len(data):
                x = np.sort(data)
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=r.strategy[:50])
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("simulated latency CDF")
    fig.tight_layout()
    p = outdir / f"{prefix}_latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    for i, r in enumerate(results):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        idx = np.arange(len(r.gpu_labels))
        axes[0].bar(idx, r.gpu_util, label="compute")
        axes[0].bar(idx, r.gpu_comm, bottom=r.gpu_util, label="comm")
        axes[0].bar(idx, r.gpu_idle, bottom=r.gpu_util + r.gpu_comm, label="idle", color="lightgrey")
        if len(idx) <= 48:
            axes[0].set_xticks(idx, r.gpu_labels, rotation=90, fontsize=6)
        axes[0].set_ylabel("fraction of time")
        axes[0].legend(fontsize=7)
        axes[0].set_title("per-GPU time")
        for tl in r.timeline:
            if tl:
                t = np.array([x[0] for x in tl])
                axes[1].plot(t, [x[1] for x in tl], lw=0.8, label="running seqs")
                ax2 = axes[1].twinx()
                ax2.plot(t, [x[3] * 1e3 for x in tl], lw=0.6, color="tab:red", alpha=0.6)
                ax2.set_ylabel("step time (ms)", color="tab:red")
        axes[1].set_xlabel("simulated time (s)")
        axes[1].set_ylabel("running sequences")
        axes[1].set_title("timeline")
        fig.suptitle(f"simulated: {r.strategy}", fontsize=9)
        fig.tight_layout()
        p = outdir / f"{prefix}_{i}_{_slug(r.strategy)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
