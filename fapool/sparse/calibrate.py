"""`fapool calibrate-heads`: measure how sparse each attention head can be, choose budgets.

Method. The model prefills windows of real text (fapool.sparse.corpus). In every layer, for
query positions p = min_pos, min_pos + stride, ... of each window (each one the query a
decode step at context p + 1 would issue), we take the exact attention probabilities, sum them
per KV block, and ask the selector the sparse backend uses (sink + recent + best key min/max
bounds, fapool.sparse.selection) which blocks it would keep at each budget fraction of a grid.
Recall = attention mass on the kept blocks. Averaged over positions and windows this gives a
recall curve per (layer, query head); `choose_budgets` turns the curves into the smallest
per-KV-head budgets meeting the target recall. Recall is measured for the selector we run,
not an oracle top-k, so the budget is what the sparse backend actually needs.

Stability (the seed's "heterogeneous yet stable"): the needs computed on the first and second
half of the windows are correlated across heads and reported in the profile.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from fapool.attention.backend import AttentionBackend
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.torch_ref import TorchReferenceBackend, _gather
from fapool.sparse.profile import SparseProfile, choose_budgets
from fapool.sparse.selection import block_order, budget_blocks

logger = logging.getLogger(__name__)

DEFAULT_GRID = [round(0.01 * i, 2) for i in range(1, 101)]


class RecallRecorder(AttentionBackend):
    """Dense attention that also measures, on prefill, the recall of block budgets."""

    name = "recall-recorder"

    def __init__(
        self, dense: AttentionBackend, grid: list[float], min_blocks: int, min_pos: int, stride: int
    ):
        self.dense = dense
        self.grid = torch.tensor(grid, dtype=torch.float64)
        self.min_blocks = min_blocks
        self.min_pos = min_pos
        self.stride = stride
        self.recall_sum: torch.Tensor | None = None  # [Hq, F]
        self.count = 0

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping) -> None:
        self.dense.write_kv(k_cache, v_cache, key, value, slot_mapping)

    def forward(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        result = self.dense.forward(query, k_cache, v_cache, meta, scale)
        for s, n_q in enumerate(meta.query_lens_cpu):
            a = int(meta.query_start_loc[s])
            self._record(
                query[a : a + n_q],
                k_cache,
                meta.block_tables[s],
                int(meta.query_pos_start[s]),
                meta.kv_lens_cpu[s],
                scale,
            )
        return result

    @torch.no_grad()
    def _record(self, q, k_cache, table, q_pos0: int, kv_len: int, scale: float) -> None:
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        pos = torch.arange(max(self.min_pos, q_pos0), q_pos0 + q.shape[0], self.stride)
        if pos.numel() == 0:
            return
        nb = math.ceil(kv_len / block_size)
        keys = _gather(k_cache, table, kv_len).float()  # [n, Hkv, D]
        pad = nb * block_size - kv_len
        padded = torch.cat([keys, keys.new_full((pad, num_kv_heads, head_dim), float("nan"))])
        blocks = padded.view(nb, block_size, num_kv_heads, head_dim)
        kmin = blocks.nan_to_num(nan=float("inf")).amin(1).transpose(0, 1)  # [Hkv, nb, D]
        kmax = blocks.nan_to_num(nan=float("-inf")).amax(1).transpose(0, 1)

        qs = q[pos - q_pos0].float()  # [S, Hq, D]
        scores = torch.einsum("shd,nhd->shn", qs, keys.repeat_interleave(group, dim=1)) * scale
        causal = torch.arange(kv_len)[None, :] <= pos[:, None]  # [S, n]
        probs = torch.softmax(scores.masked_fill(~causal[:, None], float("-inf")), dim=-1)
        mass = torch.nn.functional.pad(probs, (0, pad)).view(len(pos), num_heads, nb, block_size).sum(-1)

        qg = qs.view(len(pos), num_kv_heads, group, head_dim)
        bound = torch.einsum("shgd,hnd->shgn", qg.clamp(min=0), kmax) + torch.einsum(
            "shgd,hnd->shgn", qg.clamp(max=0), kmin
        )
        visible = pos // block_size + 1  # [S]
        order = block_order(bound.amax(dim=2), visible).repeat_interleave(group, dim=1)  # [S, Hq, nb]
        cum = mass.gather(-1, order).cumsum(-1)  # [S, Hq, nb]
        k = torch.stack([budget_blocks(self.grid, int(v), self.min_blocks) for v in visible])  # [S, F]
        recall = cum.gather(-1, (k - 1)[:, None, :].expand(-1, num_heads, -1))  # [S, Hq, F]
        total = recall.sum(0).double()
        self.recall_sum = total if self.recall_sum is None else self.recall_sum + total
        self.count += len(pos)

    def take(self) -> torch.Tensor:
        """Mean recall since the last take -> [Hq, F]; resets the sums."""
        out = self.recall_sum / max(1, self.count)
        self.recall_sum, self.count = None, 0
        return out


def load_model(model: str | None, backend: AttentionBackend, device: str = "cpu"):
    """The model (float32) and tokenizer, as the engine loads them, without an engine."""
    from fapool.models.loader import iter_weights, load_model_config, load_tokenizer, resolve_model
    from fapool.models.registry import build_model

    src = resolve_model(model)
    config = load_model_config(src)
    m = build_model(config, backend, torch.float32, device)
    if src.format == "preset":
        m.init_random_weights(0)
    else:
        m.load_weights(iter_weights(src))
    m.eval()
    return m, load_tokenizer(src), src


def new_caches(model, num_tokens: int, block_size: int, device: str = "cpu"):
    """One sequence's KV caches (blocks 0.. in order) and its block table."""
    layer = model.model.layers[0].self_attn
    num_blocks = math.ceil(num_tokens / block_size)
    shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
    caches = [
        (torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in model.model.layers
    ]
    return caches, list(range(num_blocks))


@torch.no_grad()
def prefill(model, ids: list[int], caches, table: list[int], start: int, block_size: int, chunk: int = 1024):
    """Run tokens ids (at positions start..) of one sequence in chunks; returns hidden [T, hidden]."""
    hidden = []
    for a in range(0, len(ids), chunk):
        piece = ids[a : a + chunk]
        p0 = start + a
        meta = AttentionMetadata.build(
            query_lens=[len(piece)],
            query_pos_start=[p0],
            kv_lens=[p0 + len(piece)],
            block_tables=[table],
            slot_mapping=[
                table[p // block_size] * block_size + p % block_size for p in range(p0, p0 + len(piece))
            ],
        )
        hidden.append(model(torch.tensor(piece), torch.arange(p0, p0 + len(piece)), caches, meta))
    return torch.cat(hidden)


def calibrate(
    model,
    windows: list[list[int]],
    block_size: int = 16,
    grid: list[float] | None = None,
    min_blocks: int = 4,
    min_pos: int = 256,
    stride: int = 8,
    chunk: int = 1024,
) -> torch.Tensor:
    """Recall curves per window: [num_windows, num_layers, num_heads, len(grid)]."""
    grid = grid or DEFAULT_GRID
    layers = model.model.layers
    dense = [layer.self_attn.backend for layer in layers]
    recorders = [RecallRecorder(TorchReferenceBackend(), grid, min_blocks, min_pos, stride) for _ in layers]
    for layer, rec in zip(layers, recorders):
        layer.self_attn.backend = rec
    try:
        per_window = []
        for i, ids in enumerate(windows):
            t0 = time.perf_counter()
            caches, table = new_caches(model, len(ids), block_size)
            prefill(model, ids, caches, table, 0, block_size, chunk)
            per_window.append(torch.stack([rec.take() for rec in recorders]))
            logger.info(
                "window %d/%d: %d tokens in %.1f s", i + 1, len(windows), len(ids), time.perf_counter() - t0
            )
    finally:
        for layer, backend in zip(layers, dense):
            layer.self_attn.backend = backend
    return torch.stack(per_window).float()


def _pearson(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def build_profile(
    recall: torch.Tensor,
    grid: list[float],
    target: float,
    num_kv_heads: int,
    block_size: int,
    min_blocks: int,
    model_name: str,
    info: dict,
) -> SparseProfile:
    """Per-window recall curves -> profile (budgets on the mean curves, stability on halves)."""
    num_windows, num_layers, num_heads, _ = recall.shape
    group = num_heads // num_kv_heads
    mean = recall.mean(0)
    kv_budget, need = choose_budgets(mean.tolist(), grid, target, group)
    info = dict(info)
    if num_windows >= 2:
        h = num_windows // 2
        _, need_a = choose_budgets(recall[:h].mean(0).tolist(), grid, target, group)
        _, need_b = choose_budgets(recall[h:].mean(0).tolist(), grid, target, group)
        flat = lambda m: [v for row in m for v in row]
        info["stability_pearson_halves"] = round(_pearson(flat(need_a), flat(need_b)), 4)
    # Adaptive vs a uniform budget of the same total, judged on the calibration curves.
    mean_frac = sum(map(sum, kv_budget)) / (num_layers * num_kv_heads)
    gi = torch.tensor(grid)
    uni = int(torch.searchsorted(gi, torch.tensor(mean_frac) - 1e-9).clamp(max=len(grid) - 1))
    idx = torch.tensor(
        [[grid.index(kv_budget[l][hq // group]) for hq in range(num_heads)] for l in range(num_layers)]
    )
    adaptive_recall = mean.gather(-1, idx[..., None])[..., 0]
    uniform_recall = mean[..., uni]
    info["adaptive_recall_mean_min"] = [
        round(float(adaptive_recall.mean()), 4),
        round(float(adaptive_recall.min()), 4),
    ]
    info["uniform_recall_mean_min"] = [
        round(float(uniform_recall.mean()), 4),
        round(float(uniform_recall.min()), 4),
    ]
    info["uniform_budget"] = grid[uni]
    return SparseProfile(
        model=model_name,
        block_size=block_size,
        target_recall=target,
        min_blocks=min_blocks,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        kv_budget=kv_budget,
        head_need=need,
        grid=list(grid),
        recall=[[[round(v, 4) for v in curve] for curve in layer] for layer in mean.tolist()],
        calibration=info,
    )


def plot_profile(profile: SparseProfile, path: str) -> str:
    """Heatmaps as the seed's Figures 3-4: per (layer, query head) the recall a uniform budget
    recovers, and the budget each head needs for the target recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = torch.tensor(profile.recall)  # [L, Hq, F]
    uni = profile.calibration.get("uniform_budget", profile.mean_budget)
    ui = min(range(len(profile.grid)), key=lambda i: abs(profile.grid[i] - uni))
    need = torch.tensor(profile.head_need)
    fig, axes = plt.subplots(1, 3, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 3, 1.4]})
    im0 = axes[0].imshow(recall[..., ui], aspect="auto", cmap="viridis", origin="lower")
    axes[0].set_title(f"attention recall at uniform budget {profile.grid[ui]:.0%}")
    im1 = axes[1].imshow(need, aspect="auto", cmap="magma_r", origin="lower")
    axes[1].set_title(f"budget needed for recall {profile.target_recall:.2f}")
    im2 = axes[2].imshow(torch.tensor(profile.kv_budget), aspect="auto", cmap="magma_r", origin="lower")
    axes[2].set_title("KV-head budget")
    for ax, im, xl in ((axes[0], im0, "query head"), (axes[1], im1, "query head"), (axes[2], im2, "KV head")):
        ax.set_xlabel(xl)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(
        f"{os.path.basename(profile.model)}: head sparsity ({profile.calibration.get('corpus', '')}, "
        f"mean budget {profile.mean_budget:.1%} of blocks, block {profile.block_size})"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_profile_path(model_path: str, target: float) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stem = os.path.splitext(os.path.basename(model_path.rstrip("/")))[0]
    return os.path.join(cache, "fapool", "sparse", f"{stem}-recall{target:g}.json")


def run_calibration(
    model: str | None = None,
    num_windows: int = 8,
    length: int = 2048,
    block_size: int = 16,
    target: float = 0.95,
    min_blocks: int = 4,
    min_pos: int = 256,
    stride: int = 8,
    out: str | None = None,
    plot: str | None = None,
) -> tuple[SparseProfile, str, str]:
    """Calibrate `model` on the calibration split; save the profile and its heatmap."""
    from fapool.sparse.corpus import CORPUS_PACKAGE, list_plays, token_windows

    t0 = time.perf_counter()
    m, tokenizer, src = load_model(model, TorchReferenceBackend())
    windows = token_windows(tokenizer, "calibration", num_windows, length)
    recall = calibrate(m, windows, block_size, DEFAULT_GRID, min_blocks, min_pos, stride)
    info = {
        "corpus": f"{CORPUS_PACKAGE} (Shakespeare), calibration split",
        "plays": list_plays("calibration")[:num_windows],
        "windows": num_windows,
        "length": length,
        "min_pos": min_pos,
        "stride": stride,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    profile = build_profile(
        recall,
        DEFAULT_GRID,
        target,
        m.model.layers[0].self_attn.num_kv_heads,
        block_size,
        min_blocks,
        src.path,
        info,
    )
    out = out or default_profile_path(src.path, target)
    profile.save(out)
    plot = plot or os.path.splitext(out)[0] + ".png"
    plot_profile(profile, plot)
    return profile, out, plot
