"""Issue 18, on a GPU (`PYTHONPATH=. python3 benchmarks/sampler_warps.py`): the device draw's cost by
num_warps / BLOCK of fapool.layers.triton_sampler, the kernel alone in a CUDA graph (tokens against the
torch reference), then whole seed000 decode steps, greedy and sampled, each setting recaptured."""
import statistics

import torch
import triton

import fapool.layers.triton_sampler as ts
from fapool.layers.sampling_batch import SamplingBatch
from fapool.layers.sampler import sample_tokens_torch, request_seed
from fapool.sampling_params import SamplingParams
from fapool.bench.tpot import measure_engine, SAMPLED
from fapool import LLM

VARS = [(8, 2048), (16, 2048), (32, 2048), (16, 4096), (32, 4096)]
V = 32000
for n in (8, 64):
    x = torch.randn(n, V, device="cuda") * 3
    for name, p in (("greedy", SamplingParams(temperature=0.0)), ("sampled", SamplingParams(**SAMPLED))):
        rows = [(p, request_seed(i, 0), 5) for i in range(n)]
        batch = SamplingBatch.build(rows, V, "cuda")
        want = sample_tokens_torch(x, batch)
        line = []
        for w, b in VARS:
            ts.NUM_WARPS, ts.BLOCK = w, b
            got = ts.sample_triton(x, batch)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                ts.sample_triton(x, batch)
            t = triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median")
            line.append(f"w{w}/B{b} {t*1e3:6.1f}us diff{int((got != want).sum())}")
        print(f"kernel n={n:3d} {name:8s}", " | ".join(line), flush=True)

llm = LLM("preset:seed000", gpu_memory_utilization=0.6, max_num_seqs=64, max_num_batched_tokens=16384)
eng = llm.engine
runner = eng.executor.runner
measure_engine(eng, 2, 64, 4)
for b, c in [(8, 512), (64, 512), (8, 8192)]:
    res = {}
    for rep in range(2):
        for w, blk in [(8, 2048), (32, 2048), (32, 4096), (16, 2048)]:
            ts.NUM_WARPS, ts.BLOCK = w, blk
            runner.decode_graphs = None  # recapture with these settings
            for name, s in (("greedy", {"temperature": 0.0}), ("sampled", SAMPLED)):
                r = measure_engine(eng, b, c, 32, sampling=s)
                res.setdefault((w, blk, name), []).append(r["tpot_ms"])
    for w, blk in [(8, 2048), (32, 2048), (32, 4096), (16, 2048)]:
        g, s = (statistics.median(res[(w, blk, k)]) for k in ("greedy", "sampled"))
        print(f"B{b}x{c} w{w}/B{blk}: greedy {g:.3f} sampled {s:.3f} x{s/g:.3f}", flush=True)
ts.NUM_WARPS, ts.BLOCK = 32, 2048
