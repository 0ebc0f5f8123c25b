"""SparseProfile: per (layer, KV head) block budgets for sparse decode, and how they are chosen.

A budget is a fraction of the sequence's KV blocks (the heads' elasticity the seed measures is
a ratio: a head that needs 10% of the blocks at 2K needs about as large a share at 4K). At a
step, head h of layer l attends over ceil(frac[l][h] * num_blocks) blocks, never fewer than
`min_blocks` (sink + recent + a few) nor more than all of them.

Choice (`choose_budgets`): recall[l][h][i] is the mean attention mass the selector keeps at
budget fraction grid[i] for query head h of layer l. A query head's need is the smallest grid
fraction whose recall meets the target; a KV head's budget is the largest need of its query
heads (they share one block selection). Each head then sits at its own smallest feasible
budget, so the total is the smallest that meets the target on every head.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

PROFILE_VERSION = 1


@dataclass
class SparseProfile:
    model: str  # the model it was calibrated on (name or path), informational
    block_size: int  # KV block size of the calibration; selection granularity
    target_recall: float
    min_blocks: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    kv_budget: list[list[float]]  # [layer][kv_head] budget fraction of blocks
    head_need: list[list[float]] = field(default_factory=list)  # [layer][q_head] fraction needed
    grid: list[float] = field(default_factory=list)  # budget fractions the recall was measured at
    recall: list[list[list[float]]] = field(default_factory=list)  # [layer][q_head][grid]
    calibration: dict = field(default_factory=dict)  # corpus, windows, lengths, timings
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        if len(self.kv_budget) != self.num_layers or any(len(r) != self.num_kv_heads for r in self.kv_budget):
            raise ValueError(f"kv_budget must be [{self.num_layers}][{self.num_kv_heads}]")
        if any(not 0.0 < f <= 1.0 for r in self.kv_budget for f in r):
            raise ValueError("budget fractions must lie in (0, 1]")

    @property
    def mean_budget(self) -> float:
        return sum(map(sum, self.kv_budget)) / (self.num_layers * self.num_kv_heads)

    def uniform(self, frac: float | None = None) -> SparseProfile:
        """The same profile with every head at one budget (default: this profile's mean, the
        uniform budget of the same total)."""
        f = self.mean_budget if frac is None else frac
        return SparseProfile(
            **{**asdict(self), "kv_budget": [[f] * self.num_kv_heads for _ in range(self.num_layers)]}
        )

    @classmethod
    def full(cls, num_layers: int, num_kv_heads: int, num_heads: int, block_size: int = 16) -> SparseProfile:
        """Every head attends over every block (the sparse path then equals dense)."""
        return cls(
            "any",
            block_size,
            1.0,
            1,
            num_layers,
            num_heads,
            num_kv_heads,
            [[1.0] * num_kv_heads for _ in range(num_layers)],
        )

    def retarget(self, target: float) -> SparseProfile:
        """Budgets for another target recall from the stored recall curves (no model run)."""
        if not self.recall:
            raise ValueError("this profile has no recall curves to retarget")
        kv, need = choose_budgets(self.recall, self.grid, target, self.num_heads // self.num_kv_heads)
        calibration = {
            k: v
            for k, v in self.calibration.items()
            if not k.startswith(("adaptive_", "uniform_", "stability"))
        }
        return SparseProfile(
            **{
                **asdict(self),
                "target_recall": target,
                "kv_budget": kv,
                "head_need": need,
                "calibration": {**calibration, "retargeted_from": self.target_recall},
            }
        )

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str) -> SparseProfile:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(
                f"{path}: sparse profile version {data.get('version')}, expected {PROFILE_VERSION}"
            )
        return cls(**data)


def choose_budgets(
    recall: list[list[list[float]]], grid: list[float], target: float, group: int
) -> tuple[list[list[float]], list[list[float]]]:
    """recall [layer][q_head][grid] -> (kv_budget [layer][kv_head], head_need [layer][q_head])."""
    if sorted(grid) != list(grid) or grid[-1] != 1.0:
        raise ValueError("grid must be increasing and end at 1.0")
    need = [
        [next((g for g, r in zip(grid, curve) if r >= target), 1.0) for curve in layer] for layer in recall
    ]
    kv = [[max(layer[h * group : (h + 1) * group]) for h in range(len(layer) // group)] for layer in need]
    return kv, need
