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
from dataclasses import dataclass

import torch

from fapool.attention.backend import AttentionBackend
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.torch_ref import TorchReferenceBackend, _gather
from fapool.sparse.profile import SparseProfile, choose_budgets
from fapool.sparse.selection import DEFAULT_MIN_BLOCKS, block_order, budget_blocks

logger = logging.getLogger(__name__)

DEFAULT_GRID = [round(0.01 * i, 2) for i in range(1, 101)]
# "bound": the runtime selector (sink, recent, best key min/max bounds). "oracle": blocks by their
# true attention mass, which no selector reading summaries can know: the headroom of any such
# selector (benchmarks/sparse_selector_headroom.py), never a profile the engine runs.
SELECTORS = ("bound", "oracle")


class RecallRecorder(AttentionBackend):
    """Dense attention that also measures, on prefill, the recall of block budgets, per bin of
    context length (bins: ascending context edges in tokens; the query at position p, context
    p + 1, falls in the last edge <= p + 1, contexts past the last edge in the last bin)."""

    name = "recall-recorder"

    def __init__(
        self,
        dense: AttentionBackend,
        grid: list[float],
        min_blocks: int,
        min_pos: int,
        stride: int,
        bins: list[int] | None = None,
        selector: str = "bound",
    ):
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        self.selector = selector
        self.dense = dense
        self.grid = torch.tensor(grid, dtype=torch.float64)
        self.min_blocks = min_blocks
        self.min_pos = min_pos
        self.stride = stride
        self.edges = torch.tensor(bins or [min_pos], dtype=torch.long)
        self.recall_sum: torch.Tensor | None = None  # [J, Hq, F]
        self.count = torch.zeros(len(self.edges), dtype=torch.float64)  # positions per bin
        self.context_sum = torch.zeros(len(self.edges), dtype=torch.float64)  # their contexts

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping, scales=None) -> None:
        self.dense.write_kv(k_cache, v_cache, key, value, slot_mapping, scales)

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, scales=None, new_kv=None
    ):
        result = self.dense.forward(query, k_cache, v_cache, meta, scale, scales, new_kv)
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
        dev = q.device
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

        pos_d = pos.to(dev)
        qs = q[pos_d - q_pos0].float()  # [S, Hq, D]
        scores = torch.einsum("shd,nhd->shn", qs, keys.repeat_interleave(group, dim=1)) * scale
        causal = torch.arange(kv_len, device=dev)[None, :] <= pos_d[:, None]  # [S, n]
        probs = torch.softmax(scores.masked_fill(~causal[:, None], float("-inf")), dim=-1)
        mass = torch.nn.functional.pad(probs, (0, pad)).view(len(pos), num_heads, nb, block_size).sum(-1)

        qg = qs.view(len(pos), num_kv_heads, group, head_dim)
        bound = torch.einsum("shgd,hnd->shgn", qg.clamp(min=0), kmax) + torch.einsum(
            "shgd,hnd->shgn", qg.clamp(max=0), kmin
        )
        visible = pos // block_size + 1  # [S]
        if self.selector == "oracle":  # the KV head's true attention mass per block
            rank = mass.view(len(pos), num_kv_heads, group, nb).sum(2)
        else:
            rank = bound.amax(dim=2)
        order = block_order(rank, visible.to(dev)).repeat_interleave(group, dim=1)  # [S, Hq, nb]
        cum = mass.gather(-1, order).cumsum(-1)  # [S, Hq, nb]
        k = torch.stack([budget_blocks(self.grid, int(v), self.min_blocks) for v in visible]).to(
            dev
        )  # [S, F]
        recall = cum.gather(-1, (k - 1)[:, None, :].expand(-1, num_heads, -1))  # [S, Hq, F]
        # A query at position p decodes at context p + 1: bins are context edges.
        bins = (torch.bucketize(pos + 1, self.edges, right=True) - 1).clamp(min=0)  # [S]
        total = torch.zeros(len(self.edges), num_heads, len(self.grid), dtype=torch.float64, device=dev)
        total.index_add_(0, bins.to(dev), recall.double())
        self.recall_sum = total if self.recall_sum is None else self.recall_sum + total
        self.count += torch.bincount(bins, minlength=len(self.edges)).double()
        # The bin's context as whole blocks (what the budgets were measured at, and the rule's
        # knot), in tokens: visible blocks x block size.
        self.context_sum.index_add_(0, bins, (visible * block_size).double())

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Since the last take: mean recall [J, Hq, F] (0 for an empty bin), positions [J] and
        their summed contexts [J]; resets the sums."""
        count = self.count.clone()
        if self.recall_sum is None:
            raise ValueError(f"no query position >= min_pos {self.min_pos} was recorded")
        recall = self.recall_sum.cpu() / count.clamp(min=1)[:, None, None]
        out = recall, count, self.context_sum.clone()
        self.recall_sum = None
        self.count.zero_()
        self.context_sum.zero_()
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
    dev = caches[0][0].device
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
            device=dev,
        )
        tokens = torch.tensor(piece, device=dev)
        hidden.append(model(tokens, torch.arange(p0, p0 + len(piece), device=dev), caches, meta))
    return torch.cat(hidden)


@dataclass(frozen=True)
class RecallCurves:
    """What calibrate measured: recall [W, J, L, Hq, F] per window, length bin, layer, query
    head and grid fraction; positions [W, J] measured per window and bin (0: an empty bin);
    context [W, J] their summed contexts (tokens)."""

    recall: torch.Tensor
    positions: torch.Tensor
    context: torch.Tensor

    def pooled(self, windows: slice = slice(None)) -> torch.Tensor:
        """Mean curves over the windows and bins, weighted by positions -> [L, Hq, F]."""
        w = self.positions[windows].double()[..., None, None, None]
        return ((self.recall[windows].double() * w).sum((0, 1)) / w.sum((0, 1)).clamp(min=1e-12)).float()

    def per_bin(self) -> tuple[torch.Tensor, list[float]]:
        """Mean curves per non-empty bin [J', L, Hq, F] and each bin's mean context."""
        n = self.positions.double().sum(0)  # [J]
        keep = n > 0
        w = self.positions.double()[..., None, None, None]
        curves = (self.recall.double() * w).sum(0) / n.clamp(min=1)[:, None, None, None]
        contexts = (self.context.double().sum(0) / n.clamp(min=1))[keep]
        return curves[keep].float(), [round(float(c), 1) for c in contexts]


def length_bins(min_pos: int, length: int) -> list[int]:
    """Doubling bin edges from min_pos up to the window length: 256, 512, ... < length."""
    if not 0 < min_pos < length:
        raise ValueError(f"min_pos ({min_pos}) must be positive and below the window length ({length})")
    edges = [min_pos]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges


def calibrate(
    model,
    windows: list[list[int]],
    block_size: int = 16,
    grid: list[float] | None = None,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    min_pos: int = 256,
    stride: int = 8,
    chunk: int = 1024,
    bins: list[int] | None = None,
    device: str | torch.device = "cpu",
    selector: str = "bound",
) -> RecallCurves:
    """Recall curves per window and length bin (bins: context edges in tokens, default one
    bin) of `selector` (SELECTORS)."""
    grid = grid or DEFAULT_GRID
    layers = model.model.layers
    dense = [layer.self_attn.backend for layer in layers]
    recorders = [
        RecallRecorder(TorchReferenceBackend(), grid, min_blocks, min_pos, stride, bins, selector)
        for _ in layers
    ]
    for layer, rec in zip(layers, recorders):
        layer.self_attn.backend = rec
    try:
        recall, positions, context = [], [], []
        for i, ids in enumerate(windows):
            t0 = time.perf_counter()
            caches, table = new_caches(model, len(ids), block_size, device)
            prefill(model, ids, caches, table, 0, block_size, chunk)
            taken = [rec.take() for rec in recorders]
            recall.append(torch.stack([t[0] for t in taken], dim=1))  # [J, L, Hq, F]
            positions.append(taken[0][1])
            context.append(taken[0][2])
            logger.info(
                "window %d/%d: %d tokens in %.1f s", i + 1, len(windows), len(ids), time.perf_counter() - t0
            )
    finally:
        for layer, backend in zip(layers, dense):
            layer.self_attn.backend = backend
    return RecallCurves(torch.stack(recall).float(), torch.stack(positions), torch.stack(context))


def _pearson(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def _adaptive_vs_uniform(mean: torch.Tensor, kv_budget, grid: list[float], group: int) -> dict:
    """Recall (mean, min over heads) of the adaptive budgets and of a uniform budget of the same
    total, judged on the calibration curves mean [L, Hq, F]."""
    num_layers, num_heads, _ = mean.shape
    mean_frac = sum(map(sum, kv_budget)) / (num_layers * len(kv_budget[0]))
    gi = torch.tensor(grid)
    uni = int(torch.searchsorted(gi, torch.tensor(mean_frac) - 1e-9).clamp(max=len(grid) - 1))
    idx = torch.tensor(
        [[grid.index(kv_budget[l][hq // group]) for hq in range(num_heads)] for l in range(num_layers)]
    )
    adaptive = mean.gather(-1, idx[..., None])[..., 0]
    uniform = mean[..., uni]
    return {
        "adaptive_recall_mean_min": [round(float(adaptive.mean()), 4), round(float(adaptive.min()), 4)],
        "uniform_recall_mean_min": [round(float(uniform.mean()), 4), round(float(uniform.min()), 4)],
        "uniform_budget": grid[uni],
    }


def build_profile(
    curves: RecallCurves,
    grid: list[float],
    target: float,
    num_kv_heads: int,
    block_size: int,
    min_blocks: int,
    model_name: str,
    info: dict,
) -> SparseProfile:
    """Recall curves -> profile: budgets per length bin (one bin: one fraction per head),
    stability on the halves of the windows, adaptive vs uniform per bin."""
    num_windows, _, num_layers, num_heads, _ = curves.recall.shape
    group = num_heads // num_kv_heads
    pooled = curves.pooled()
    by_bin, contexts = curves.per_bin()
    info = dict(info)
    if num_windows >= 2:
        h = num_windows // 2
        _, need_a = choose_budgets(curves.pooled(slice(None, h)).tolist(), grid, target, group)
        _, need_b = choose_budgets(curves.pooled(slice(h, None)).tolist(), grid, target, group)
        flat = lambda m: [v for row in m for v in row]
        info["stability_pearson_halves"] = round(_pearson(flat(need_a), flat(need_b)), 4)
    if len(contexts) <= 1:  # one fraction per head at every length
        kv_budget, need = choose_budgets(pooled.tolist(), grid, target, group)
        info.update(_adaptive_vs_uniform(pooled, kv_budget, grid, group))
        lengths, kv_by, need_by, recall_by = [], [], [], []
    else:
        chosen = [choose_budgets(c.tolist(), grid, target, group) for c in by_bin]
        kv_by, need_by = [c[0] for c in chosen], [c[1] for c in chosen]
        kv_budget, need = kv_by[0], need_by[0]
        lengths = contexts
        recall_by = [
            [[[round(v, 4) for v in curve] for curve in layer] for layer in c.tolist()] for c in by_bin
        ]
        per_bin = [_adaptive_vs_uniform(c, kv, grid, group) for c, kv in zip(by_bin, kv_by)]
        for key in per_bin[0]:
            info[f"{key}_by_length"] = [b[key] for b in per_bin]
        info["mean_budget_by_length"] = [
            round(sum(map(sum, kv)) / (num_layers * num_kv_heads), 4) for kv in kv_by
        ]
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
        recall=[[[round(v, 4) for v in curve] for curve in layer] for layer in pooled.tolist()],
        calibration=info,
        lengths=lengths,
        kv_budget_by_length=kv_by,
        head_need_by_length=need_by,
        recall_by_length=recall_by,
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
    ratios = [3, 3, 1.4] + ([3] if profile.lengths else [])
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(4.3 * len(ratios), 6), gridspec_kw={"width_ratios": ratios}
    )
    im0 = axes[0].imshow(recall[..., ui], aspect="auto", cmap="viridis", origin="lower")
    axes[0].set_title(f"attention recall at uniform budget {profile.grid[ui]:.0%}")
    im1 = axes[1].imshow(need, aspect="auto", cmap="magma_r", origin="lower")
    at = f" at {profile.lengths[0]:.0f} tokens" if profile.lengths else ""
    axes[1].set_title(f"budget needed for recall {profile.target_recall:.2f}{at}")
    im2 = axes[2].imshow(torch.tensor(profile.kv_budget), aspect="auto", cmap="magma_r", origin="lower")
    axes[2].set_title("KV-head budget")
    for ax, im, xl in ((axes[0], im0, "query head"), (axes[1], im1, "query head"), (axes[2], im2, "KV head")):
        ax.set_xlabel(xl)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    if profile.lengths:  # the length rule: budget share per KV head over the context
        ax = axes[3]
        measured = [int(x) for x in profile.lengths]
        shown = sorted({*measured, 2 * measured[-1], 4 * measured[-1]})
        tables = [torch.tensor(profile.fractions_at(c)) for c in shown]  # [L, Hkv] each
        stack = torch.stack(tables)  # [C, L, Hkv]
        flat = stack.flatten(1)
        ax.fill_between(shown, flat.amin(1), flat.amax(1), alpha=0.2, label="min-max over heads")
        ax.plot(shown, flat.mean(1), "o-", label="mean KV-head budget")
        ax.axvline(measured[-1], ls=":", c="gray", label="past here: extrapolated")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("share of KV blocks read")
        ax.set_title("budget over the context length")
        ax.legend(fontsize=8)
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
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    min_pos: int = 256,
    stride: int = 8,
    out: str | None = None,
    plot: str | None = None,
    bins: list[int] | None = None,
    device: str = "cpu",
) -> tuple[SparseProfile, str, str]:
    """Calibrate `model` on the calibration split; save the profile and its heatmap.
    bins: token edges of the length bins (default: doubling from min_pos; one edge gives one
    fraction per head at every length)."""
    from fapool.sparse.corpus import CORPUS_PACKAGE, token_windows

    t0 = time.perf_counter()
    bins = bins or length_bins(min_pos, length)
    if bins[0] < min_pos or any(b <= a for a, b in zip(bins, bins[1:])) or bins[-1] >= length:
        raise ValueError(
            f"bins must ascend from min_pos {min_pos} and stay below the window length {length}: {bins}"
        )
    m, tokenizer, src = load_model(model, TorchReferenceBackend(), device)
    windows, plays = token_windows(tokenizer, "calibration", num_windows, length, with_names=True)
    curves = calibrate(
        m, windows, block_size, DEFAULT_GRID, min_blocks, min_pos, stride, bins=bins, device=device
    )
    info = {
        "corpus": f"{CORPUS_PACKAGE} (Shakespeare), calibration split",
        "plays": plays,
        "windows": num_windows,
        "length": length,
        "min_pos": min_pos,
        "stride": stride,
        "bins": bins,  # context edges asked for; `lengths` has one entry per non-empty bin
        "positions_per_bin": [int(x) for x in curves.positions.sum(0).tolist()],
        "device": device,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    profile = build_profile(
        curves,
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
