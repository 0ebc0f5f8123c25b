"""Probe: what Hopper's programmatic dependent launch (PDL) saves in a CUDA-graphed chain shaped
like seed000's decode step at 8 rows (per layer: norm, qkv, a small kernel, o, norm, up, down;
4 layers), before building it into the engine's kernels.

Variants of the same chain, timed as graph replays: plain launches; PDL (each kernel waits for
its predecessor before reading) with the dependents let launch at a kernel's start, after its
main loop, or at its end; each with and without the matmul's first weight tile loaded before
the wait (weights are no predecessor's output). Also
checks that the graphs give the same outputs and that the PTX holds the griddepcontrol ops.

    python benchmarks/pdl_probe.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _trigger(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _trigger_wait(USE_PDL: tl.constexpr, EARLY: tl.constexpr = 1):
    """EARLY: 1 lets the dependents launch at once, 0 leaves it to this kernel's end (or to a
    later _trigger)."""
    if EARLY == 1:
        _trigger(USE_PDL)
    if USE_PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _small(X, Y, n, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr, BLOCK: tl.constexpr):
    _trigger_wait(USE_PDL, TRIGGER == 1)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + row * n + offs, mask=offs < n, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / n + 1e-6)
    tl.store(Y + row * n + offs, (x * r).to(Y.dtype.element_ty), mask=offs < n)


@triton.jit
def _mm(X, W, Y, M, N, K, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr, PREFETCH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + offs_n[:, None] * K + offs_k[None, :]
    x_ptrs = X + offs_m[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k0 = 0
    if PREFETCH:
        w0 = tl.load(w_ptrs)
        _trigger_wait(USE_PDL, TRIGGER == 1)
        acc = tl.dot(w0, tl.load(x_ptrs, mask=(offs_m < M)[None, :], other=0.0), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k0 = BLOCK_K
    else:
        _trigger_wait(USE_PDL, TRIGGER == 1)
    for _ in range(k0, K, BLOCK_K):
        w = tl.load(w_ptrs)
        xt = tl.load(x_ptrs, mask=(offs_m < M)[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if TRIGGER == 2:  # after the main loop: the dependents launch into this kernel's tail
        _trigger(USE_PDL)
    tl.store(Y + offs_m[None, :] * N + offs_n[:, None], acc.to(Y.dtype.element_ty), mask=(offs_m < M)[None, :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, bf16, m, h = "cuda", torch.bfloat16, 8, 4096
    # seed000 per layer: qkv 12288x4096, o 4096x4096, up 16384x4096, down 4096x16384 (+ LM head)
    shapes = [(12288, h, 64, 128, 4), (h, h, 64, 256, 4), (16384, h, 64, 128, 4), (h, 16384, 32, 256, 5)]
    weights = [[torch.randn(n, k, dtype=bf16, device=dev) / 64 for n, k, *_ in shapes] for _ in range(4)]
    head = torch.randn(32000, h, dtype=bf16, device=dev) / 64
    x0 = torch.randn(m, h, dtype=bf16, device=dev)
    bufs = {n: torch.empty(m, n, dtype=bf16, device=dev) for n in (h, 12288, 16384, 32000)}
    small_out = torch.empty(m, h, dtype=bf16, device=dev)

    def mm(x, w, cfg, pdl, pre, trig):
        n, k = w.shape
        bn, bk, ns = cfg
        y = bufs[n]
        kw = {"launch_pdl": True} if pdl else {}
        _mm[(n // bn,)](x, w, y, m, n, k, USE_PDL=pdl, TRIGGER=trig, PREFETCH=pre, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=4, num_stages=ns, **kw)
        return y

    def small(x, pdl, trig):
        kw = {"launch_pdl": True} if pdl else {}
        _small[(m,)](x, small_out, h, USE_PDL=pdl, TRIGGER=1 if trig else 0, BLOCK=h, num_warps=16, **kw)
        return small_out

    def step(pdl, pre, trig):  # trig: the matmuls' TRIGGER; small kernels trigger at once unless 0
        x = x0
        for layer in weights:
            x = small(x, pdl, trig)
            qkv = mm(x, layer[0], shapes[0][2:], pdl, pre, trig)
            x = small(qkv[:, :h], pdl, trig)
            x = mm(x, layer[1], shapes[1][2:], pdl, pre, trig)
            x = small(x, pdl, trig)
            u = mm(x, layer[2], shapes[2][2:], pdl, pre, trig)
            x = mm(u, layer[3], shapes[3][2:], pdl, pre, trig)
        x = small(x, pdl, trig)
        return mm(x, head, (128, 128, 3), pdl, pre, trig).clone()

    res = {"gpu": torch.cuda.get_device_name(0), "triton": triton.__version__, "torch": torch.__version__,
           "commit": os.environ.get("FAPOOL_COMMIT", "?"), "variants": {}}
    try:
        ptx = _mm.warmup(bufs[h], weights[0][0], bufs[h], m, 12288, h, USE_PDL=True, TRIGGER=1, PREFETCH=True, BLOCK_M=16,
                         BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, grid=(1,)).asm["ptx"]
    except Exception as ex:  # noqa: BLE001 - the check is secondary to the timing
        ptx = f"warmup failed: {ex}"
    res["ptx_has_wait"] = "griddepcontrol.wait" in ptx
    res["ptx_has_launch_dependents"] = "griddepcontrol.launch_dependents" in ptx
    outs = {}
    graphs = {}
    variants = {  # (PDL, weight tile before the wait, trigger: 0 at the end, 1 at the start, 2 after the loop)
        "plain": (False, False, 0),
        "pdl_trigger_start": (True, False, 1),
        "pdl_trigger_start_prefetch": (True, True, 1),
        "pdl_no_trigger": (True, False, 0),
        "pdl_no_trigger_prefetch": (True, True, 0),
        "pdl_trigger_after_loop": (True, False, 2),
        "pdl_trigger_after_loop_prefetch": (True, True, 2),
    }
    for name, (pdl, pre, trig) in variants.items():
        step(pdl, pre, trig)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step(pdl, pre, trig)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs[name] = step(pdl, pre, trig)
        graphs[name] = g
    times = {k: [] for k in variants}
    for _ in range(30):  # alternate the variants, 10 replays each a round
        for name, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            a.record()
            for _ in range(10):
                g.replay()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b) * 1e3 / 10)
    wbytes = sum(w.numel() * 2 for layer in weights for w in layer) + head.numel() * 2
    for name in variants:
        ts = sorted(times[name])
        res["variants"][name] = {"median_us": ts[len(ts) // 2], "min_us": ts[0],
                                 "equal_to_plain": bool(torch.equal(outs[name], outs["plain"]))}
    res["weight_bytes"] = wbytes
    base = res["variants"]["plain"]["median_us"]
    for name, v in res["variants"].items():
        print(f"{name:14s} {v['median_us']:8.1f} us (min {v['min_us']:.1f})  x{v['median_us'] / base:.3f}  "
              f"{wbytes / v['median_us'] / 1e6:.2f} TB/s of weights  equal {v['equal_to_plain']}")
    print("ptx griddepcontrol wait / launch_dependents:", res["ptx_has_wait"], res["ptx_has_launch_dependents"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
