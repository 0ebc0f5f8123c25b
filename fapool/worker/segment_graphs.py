"""CUDA graphs of a dense rank's decode work between attention exchanges.

A multi-rank decode step cannot be one graph per rank while its attention goes through an
exchange the host drives (gloo, host-staged; the pool's answers merged as they arrive). What
lies between two exchanges can: per layer, the attention output projection, the residual, the
MLP and the next layer's norm, QKV projection and rotary. So a dense rank's decode step of n
rows (padded to a capture size) replays

    graph 0      embedding (first stage) or the incoming hidden state, rotary, layer 0's q/k/v
    attend       layer 0, eagerly: the attend hook (local attention, the pool exchange)
    graph 1      layer 0's output and MLP, layer 1's q/k/v
    ...
    graph L      the last layer's output and MLP, the final norm (last stage)

through static buffers, one set per micro-batch slot (micro-batches interleave layer by layer).
Padded rows compute on stale values and are never read: every op here is row-wise.

A tensor-parallel rank's all-reduces (after the output and down projections) run eagerly too, so
its layer after the exchange is three graphs: the output projection's partial sum; the residual
and the MLP's partial sum; the residual and the next layer's q/k/v.

Graphs are captured lazily per (slot, padded size) into one memory pool; everything that lives
from one graph to the next is in the static buffers, so a graph's temporaries may reuse another's.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import nn

from fapool.layers.tp import AllReduce, row_partial
from fapool.models.llama import AttendFn, KVCache
from fapool.worker.cuda_graphs import capture_sizes


@dataclass
class _Buffers:
    inp: torch.Tensor  # token ids [B] (first stage) or hidden states [B, hidden]
    pos: torch.Tensor  # [B]
    x: torch.Tensor  # the residual stream [B, hidden]
    cos: torch.Tensor
    sin: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor  # the attend hook's result [B, H, D]
    part: torch.Tensor  # a TP rank's partial sum, all-reduced between graphs [B, hidden]
    out: torch.Tensor  # hidden states leaving the rank [B, hidden]


class SegmentGraphs:
    def __init__(
        self,
        model: nn.Module,
        layers: range,
        max_num_seqs: int,
        device: torch.device,
        dtype,
        all_reduce: AllReduce | None = None,  # a TP rank's in-place sum over its group
    ) -> None:
        self.model = model.model  # the LlamaModel: embeddings, rotary table, layers, final norm
        self.layers = layers
        self.all_reduce = all_reduce
        self.first = layers.start == 0
        self.last = layers.stop == len(self.model.layers)
        self.sizes = capture_sizes(max_num_seqs)
        self.device = device
        self.dtype = dtype
        self._pool = torch.cuda.graph_pool_handle()
        # (slot, size) -> buffers, the head graph, each layer's graphs after its attention
        self._graphs: dict[tuple[int, int], tuple[_Buffers, list[list[torch.cuda.CUDAGraph]]]] = {}

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def steps(
        self, slot: int, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], attend: AttendFn
    ) -> Generator[None, None, torch.Tensor]:
        """LlamaModel.forward_steps for a decode micro-batch (one token per row), through the
        graphs of micro-batch `slot`: the same yields, the same result."""
        n = positions.shape[0]
        b, graphs = self._get(slot, self.padded_size(n))
        b.inp[:n].copy_(x)
        b.pos[:n].copy_(positions)
        graphs[0][0].replay()
        for j, (i, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            pending = attend(i, b.q[:n], b.k[:n], b.v[:n], kv_cache)
            if pending.in_flight:
                yield
            b.attn[:n].copy_(pending.result())
            first, *rest = graphs[j + 1]
            first.replay()
            for graph in rest:  # a TP rank: sum the partial, then the next segment
                self.all_reduce(b.part[:n])
                graph.replay()
        return b.out[:n].clone()  # the slot's buffers are rewritten by its next step

    # Segments ---------------------------------------------------------------------------------
    def _head(self, b: _Buffers) -> None:
        x = self.model.embed_tokens(b.inp) if self.first else b.inp
        b.x.copy_(x)
        cos, sin = self.model.rotary_emb(b.pos)
        b.cos.copy_(cos)
        b.sin.copy_(sin)
        self._project(b, self.layers[0])

    def _layer_segments(self, b: _Buffers, j: int) -> list:
        """Layer layers[j]'s work after its attention, cut at the all-reduces on a TP rank."""
        layer = self.model.layers[self.layers[j]]
        if self.all_reduce is None:

            def whole() -> None:
                b.x.add_(layer.self_attn.output(b.attn))
                b.x.add_(layer.mlp(layer.post_attention_layernorm(b.x)))
                self._next(b, j)

            return [whole]

        def output() -> None:
            b.part.copy_(row_partial(layer.self_attn.o_proj, b.attn.reshape(b.attn.shape[0], -1)))

        def mlp() -> None:
            b.x.add_(b.part)
            b.part.copy_(row_partial(layer.mlp.down_proj, layer.mlp.activated(layer.post_attention_layernorm(b.x))))

        def residual() -> None:
            b.x.add_(b.part)
            self._next(b, j)

        return [output, mlp, residual]

    def _next(self, b: _Buffers, j: int) -> None:
        """The next layer's q/k/v, or the stage's output."""
        if j + 1 < len(self.layers):
            self._project(b, self.layers[j + 1])
        else:
            b.out.copy_(self.model.norm(b.x) if self.last else b.x)

    def _project(self, b: _Buffers, i: int) -> None:
        layer = self.model.layers[i]
        q, k, v = layer.self_attn.project(layer.input_layernorm(b.x), b.cos, b.sin)
        b.q.copy_(q)
        b.k.copy_(k)
        b.v.copy_(v)

    # Capture ----------------------------------------------------------------------------------
    def _get(self, slot: int, size: int | None) -> tuple[_Buffers, list[list[torch.cuda.CUDAGraph]]]:
        if size is None:
            raise ValueError(f"a decode micro-batch larger than the largest graph ({self.sizes[-1]})")
        entry = self._graphs.get((slot, size))
        if entry is None:
            entry = self._graphs[(slot, size)] = self._capture(size)
        return entry

    def _buffers(self, size: int) -> _Buffers:
        dev, dt = self.device, self.dtype
        hidden = self.model.norm.weight.shape[0]
        attn0 = self.model.layers[self.layers[0]].self_attn
        heads, kv_heads, dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        pos = torch.zeros(size, dtype=torch.long, device=dev)
        cos, sin = self.model.rotary_emb(pos)
        inp = (
            torch.zeros(size, dtype=torch.long, device=dev)
            if self.first
            else torch.zeros(size, hidden, dtype=dt, device=dev)
        )
        return _Buffers(
            inp=inp,
            pos=pos,
            x=torch.zeros(size, hidden, dtype=dt, device=dev),
            cos=torch.zeros_like(cos),
            sin=torch.zeros_like(sin),
            q=torch.zeros(size, heads, dim, dtype=dt, device=dev),
            k=torch.zeros(size, kv_heads, dim, dtype=dt, device=dev),
            v=torch.zeros(size, kv_heads, dim, dtype=dt, device=dev),
            attn=torch.zeros(size, heads, dim, dtype=dt, device=dev),
            part=torch.zeros(size, hidden, dtype=dt, device=dev),
            out=torch.zeros(size, hidden, dtype=dt, device=dev),
        )

    @torch.inference_mode()
    def _capture(self, size: int) -> tuple[_Buffers, list[list[torch.cuda.CUDAGraph]]]:
        b = self._buffers(size)
        segments = [[lambda: self._head(b)]] + [self._layer_segments(b, j) for j in range(len(self.layers))]
        # Warm-up on a side stream (kernels compiled, workspaces created), then capture. The
        # warm-up's partial sums are not all-reduced: its values are never read.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for group in segments:
                for run in group:
                    run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs = []
        for group in segments:
            captured = []
            for run in group:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    run()
                captured.append(graph)
            graphs.append(captured)
        return b, graphs
