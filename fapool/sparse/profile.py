"""SparseProfile: per (layer, KV head) block budgets for sparse decode, and how they are chosen.

A budget is a share of the sequence's KV blocks that depends on the context length. A profile
calibrated at one length (`lengths` empty) has one fraction per head: head h of layer l attends
over ceil(frac[l][h] * num_blocks) blocks at every length. A profile calibrated at several
lengths (`lengths`: the mean context of each calibration bin, in tokens) has a fraction per
head at each of them (`kv_budget_by_length`); between them the head's *block count* is
interpolated linearly, past the longest one it grows with the last segment's slope (at least a
quarter of its share there), and below the shortest one it keeps that one's fraction
(fapool.sparse.selection.BudgetRule). Measured on SmolLM2 over 0.5K-8K, the share a head needs
for a given recall falls as the context grows, so one fraction fitted at 2K over-spends at long
contexts and under-spends at short ones. Past the calibrated lengths the rule extrapolates: it
over-estimates (errs towards reading more) when the blocks a head needs grow concavely in the
length, each doubling adding no more than the last did, which is what SmolLM2's curves show
(mean marginal share 0.49 -> 0.36 -> 0.23 between its four lengths at recall 0.95); a model
whose needs grew convexly past them would be under-served. Never fewer than `min_blocks` (sink
+ recent + a few) nor more than all blocks.

Choice (`choose_budgets`): recall[l][h][i] is the mean attention mass the selector keeps at
budget fraction grid[i] for query head h of layer l (per length bin for the length rule). A
query head's need is the smallest grid fraction whose recall meets the target; a KV head's
budget is the largest need of its query heads (they share one block selection). Each head then
sits at its own smallest feasible budget, so the total is the smallest that meets the target on
every head.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from fapool.sparse.selection import BudgetRule

PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one fraction per head (no length bins)


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
    # The length rule (empty: one fraction per head at every length). lengths[j] is the mean
    # context (tokens) of calibration bin j, ascending; kv_budget and head_need are then bin 0's
    # (the rule below the shortest length), `recall` stays the curves of all positions pooled.
    lengths: list[float] = field(default_factory=list)
    kv_budget_by_length: list[list[list[float]]] = field(default_factory=list)  # [bin][layer][kv_head]
    head_need_by_length: list[list[list[float]]] = field(default_factory=list)  # [bin][layer][q_head]
    recall_by_length: list[list[list[list[float]]]] = field(default_factory=list)  # [bin][layer][q_head][grid]
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        for name, table in (("kv_budget", self.kv_budget), *(
            (f"kv_budget_by_length[{j}]", t) for j, t in enumerate(self.kv_budget_by_length)
        )):
            if len(table) != self.num_layers or any(len(r) != self.num_kv_heads for r in table):
                raise ValueError(f"{name} must be [{self.num_layers}][{self.num_kv_heads}]")
            if any(not 0.0 < f <= 1.0 for r in table for f in r):
                raise ValueError("budget fractions must lie in (0, 1]")
        if len(self.kv_budget_by_length) != len(self.lengths):
            raise ValueError("kv_budget_by_length needs one table per calibrated length")
        for name, tables in (("head_need_by_length", self.head_need_by_length), ("recall_by_length", self.recall_by_length)):
            if tables and len(tables) != len(self.lengths):
                raise ValueError(f"{name} needs one table per calibrated length (or none)")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])) or any(x <= 0 for x in self.lengths):
            raise ValueError(f"lengths must be positive and ascending, got {self.lengths}")
        if self.lengths and self.kv_budget != self.kv_budget_by_length[0]:
            raise ValueError("kv_budget must equal the budgets at the shortest calibrated length")
        self.version = PROFILE_VERSION  # a version-1 file loads as (and saves as) this version

    # --- the budgets at a context length -------------------------------------------------

    def _rule_of(self, by_length: list[list[list[float]]], flat: list[list[float]], layer: int) -> BudgetRule:
        if not self.lengths:
            return BudgetRule.fractions(flat[layer])
        if not by_length:
            raise ValueError("this profile has no per-length query-head needs")
        knots = [length / self.block_size for length in self.lengths]
        return BudgetRule.from_knots([table[layer] for table in by_length], knots)

    def rule(self, layer: int) -> BudgetRule:
        """Layer's KV-head budgets as a rule in the block count (what the sparse backend runs)."""
        return self._rule_of(self.kv_budget_by_length, self.kv_budget, layer)

    def need_rule(self, layer: int) -> BudgetRule:
        """The same for the layer's query heads' own needs."""
        return self._rule_of(self.head_need_by_length, self.head_need, layer)

    def fractions_at(self, context: int, query_heads: bool = False) -> list[list[float]]:
        """[layer][head] budget fractions at `context` tokens (rounded up to blocks, clamped as
        the backend does): KV heads, or the query heads' needs."""
        from fapool.sparse.selection import budget_blocks

        if context < 1:
            raise ValueError(f"context must be >= 1 token, got {context}")
        nb = -(-context // self.block_size)
        rule = self.need_rule if query_heads else self.rule
        return [
            [int(k) / nb for k in budget_blocks(rule(layer), nb, self.min_blocks)] for layer in range(self.num_layers)
        ]

    def mean_budget_at(self, context: int) -> float:
        table = self.fractions_at(context)
        return sum(map(sum, table)) / (self.num_layers * self.num_kv_heads)

    @property
    def mean_budget(self) -> float:
        """Mean KV-head budget fraction (at the shortest calibrated length for a length rule)."""
        return sum(map(sum, self.kv_budget)) / (self.num_layers * self.num_kv_heads)

    def uniform(self, frac: float | None = None) -> SparseProfile:
        """The same profile with every head of every layer at one budget (default: this
        profile's mean, the uniform budget of the same total; for a length rule, the mean
        fraction at each calibrated length. The totals then match at those lengths up to the
        rule's rounding and its non-decreasing block counts, which can lift a head's knot)."""
        def flat(table: list[list[float]], f: float | None) -> list[list[float]]:
            mean = sum(map(sum, table)) / (self.num_layers * self.num_kv_heads) if f is None else f
            return [[mean] * self.num_kv_heads for _ in range(self.num_layers)]

        by_length = [flat(t, frac) for t in self.kv_budget_by_length]
        return SparseProfile(
            **{
                **asdict(self),
                "kv_budget": by_length[0] if by_length else flat(self.kv_budget, frac),
                "kv_budget_by_length": by_length,
            }
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
        if self.lengths and not self.recall_by_length:
            raise ValueError("this profile has no per-length recall curves to retarget")
        group = self.num_heads // self.num_kv_heads
        by_length = [choose_budgets(r, self.grid, target, group) for r in self.recall_by_length]
        # kv_budget / head_need: the shortest length's for a length rule, else the pooled curves'
        kv, need = by_length[0] if by_length else choose_budgets(self.recall, self.grid, target, group)
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
                "kv_budget_by_length": [b[0] for b in by_length],
                "head_need_by_length": [b[1] for b in by_length],
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
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: sparse profile version {data.get('version')}, expected one of {READABLE_VERSIONS}"
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
