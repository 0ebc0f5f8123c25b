"""Closed-form sizing of AFD rA-1F bundles (seed 002); derivation in docs/afd_ratio.md.

One bundle: r attention GPUs, each holding b decoding sequences, and one FFN instance of
f_tp GPUs that runs every layer's FFN on the r*b tokens. A step's layer takes

    overlap (ping-pong):  E[ max(A_max(r), F(r b)) ]
    no overlap:           E[ A_max(r) ] + F(r b) + 2 * network

where A_max(r) is the slowest attention GPU's layer time (each GPU's attention time is
affine in S, the KV tokens it reads; S is about normal, see queueing.py) and F(n) is the FFN
instance's layer time on n tokens. Throughput per GPU is

    Theta(r) = r b / ( E[step(r)] * (r + f_tp) ),

and the optimal ratio is its argmax over integers r, found by scanning Theta (a closed-form
expression, so the scan costs microseconds per r). `balance_ratio` and `ffn_bound_ratio` give
the two analytic landmarks the argmax lies near.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.queueing import ContextMoments, expected_max_with_constant, max_normal_moments
from fapool.sim.strategies import AFD


@dataclass(frozen=True)
class AFDPoint:
    r: int
    step_time: float  # expected seconds per decode step (= TPOT in steady state)
    throughput_per_gpu: float  # tokens/s/GPU
    attn_layer_mean: float  # mean attention-GPU layer time (one GPU)
    attn_layer_max: float  # expected slowest of r
    ffn_layer: float


@dataclass(frozen=True)
class AFDPlan:
    best: AFDPoint
    b: int
    f_tp: int
    overlap: bool
    balance_ratio: float  # r where mean attention time == FFN time
    ffn_bound_ratio: float  # optimum if FFN-bound from the start (sqrt rule)
    curve: list[AFDPoint]


class AFDModel:
    """Closed-form expected step time and throughput of an rA-1F bundle."""

    def __init__(self, cost: CostModel, moments: ContextMoments, b: int, f_tp: int = 1, overlap: bool = True):
        if b < 1 or f_tp < 1:
            raise SimInputError("AFD needs b >= 1 sequences per attention GPU and f_tp >= 1")
        self.cost, self.m, self.b, self.f_tp, self.overlap = cost, moments, b, f_tp, overlap
        self.template = AFD(r=1, f_tp=f_tp, max_batch_per_attn=b, overlap=overlap)
        s0 = b * moments.mean
        self.sum_sd = moments.sd * math.sqrt(b)
        # Attention side is affine in S over the range that matters: linearise around the mean.
        a0 = self._a_side(s0)
        ds = max(self.sum_sd, 1.0)
        self.a_mean = a0
        self.alpha = (self._a_side(s0 + ds) - a0) / ds
        self.a_net = float(self.template.attn_layer(cost, b, s0, s0)[1])

    def _a_side(self, s: float) -> float:
        # The bundle size only enters through same_node(); use a large bundle (NIC links).
        t = AFD(r=64, f_tp=self.f_tp, max_batch_per_attn=self.b, overlap=self.overlap)
        compute, net = t.attn_layer(self.cost, self.b, s, s)
        return float(max(compute, net) if self.overlap else compute)

    def _f_side(self, r: int) -> tuple[float, float]:
        t = AFD(r=r, f_tp=self.f_tp, max_batch_per_attn=self.b, overlap=self.overlap)
        c, ar, net = t.ffn_layer(self.cost, r * self.b)
        return (max(c + ar, net) if self.overlap else c + ar), net

    def point(self, r: int) -> AFDPoint:
        cost = self.cost
        e, s = max_normal_moments(r)
        a_max_mean = self.a_mean + self.alpha * self.sum_sd * e
        a_max_sd = self.alpha * self.sum_sd * s
        f_side, f_net = self._f_side(r)
        if self.overlap:
            layer = expected_max_with_constant(a_max_mean, a_max_sd, f_side)
        else:
            layer = a_max_mean + f_side + 2 * max(f_net, self.a_net)
        n = r * self.b
        step = cost.model.num_hidden_layers * layer + float(cost.lm_head(n, self.f_tp)) + cost.step_overhead()
        return AFDPoint(r, step, n / (step * (r + self.f_tp)), self.a_mean, a_max_mean, f_side)

    def balance_ratio(self) -> float:
        """r solving mean attention time = FFN time, with F(n) ~ beta + gamma * n linearised at large n."""
        n1, n2 = 4096, 8192
        f1 = self._f_side(max(1, n1 // self.b))[0]
        f2 = self._f_side(max(1, n2 // self.b))[0]
        r1, r2 = max(1, n1 // self.b) * self.b, max(1, n2 // self.b) * self.b
        gamma = (f2 - f1) / max(1, r2 - r1)
        beta = f1 - gamma * r1
        return max(0.0, (self.a_mean - beta) / (gamma * self.b)) if gamma > 0 else math.inf

    def ffn_bound_ratio(self) -> float:
        """Maximiser of r / ((r + f_tp)(beta + gamma r b)): sqrt(f_tp * beta / (gamma * b))."""
        f1, f2 = self._f_side(1)[0], self._f_side(2)[0]
        gamma = max(f2 - f1, 1e-15) / self.b
        beta = max(f1 - gamma * self.b, 0.0)
        return math.sqrt(self.f_tp * beta / (gamma * self.b))

    def optimise(self, r_max: int = 4096) -> AFDPlan:
        curve = []
        best = None
        for r in range(1, r_max + 1):
            p = self.point(r)
            curve.append(p)
            if best is None or p.throughput_per_gpu > best.throughput_per_gpu:
                best = p
            elif r > 2 * best.r + 8 and p.throughput_per_gpu < 0.8 * best.throughput_per_gpu:
                break  # well past the peak: Theta only falls from here
        return AFDPlan(best, self.b, self.f_tp, self.overlap, self.balance_ratio(), self.ffn_bound_ratio(), curve)
