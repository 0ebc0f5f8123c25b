"""Issue 18, on a GPU (`PYTHONPATH=. python3 benchmarks/sampled_delta.py`): where the time that sampled
requests add to a decode step over greedy ones goes. TPOT and graph replay of five sampling variants
alternated at three seed000 points, then a torch.profiler table of real async steps, greedy and sampled."""
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from fapool import LLM, SamplingParams
from fapool.sampling_params import RequestOutputKind
from fapool.bench.tpot import measure_engine, random_prompts, SAMPLED

llm = LLM("preset:seed000", gpu_memory_utilization=0.6, max_num_seqs=64, max_num_batched_tokens=16384)
eng = llm.engine
measure_engine(eng, 2, 64, 4)
V = {"greedy": {"temperature": 0.0}, "sampled": SAMPLED, "T.8seed": {"temperature": 0.8, "seed": 0},
     "T.8p-noseed": {"temperature": 0.8, "top_p": 0.95}, "greedy+seed": {"temperature": 0.0, "seed": 0}}
for b, c in [(8, 512), (8, 8192), (64, 512)]:
    res = {k: [] for k in V}
    for rep in range(3):
        for k, s in V.items():
            r = measure_engine(eng, b, c, 32, sampling=s)
            res[k].append((r["tpot_ms"], r["graph_replay_ms"]))
    for k, v in res.items():
        print(f"B{b}x{c} {k:12s} tpot/replay", " ".join("%.3f/%.3f" % t for t in v),
              "med tpot %.3f" % statistics.median(t[0] for t in v), flush=True)

def prof(b, c, s, steps=24):
    p = SamplingParams(**s, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [eng.add_request(x, p) for x in random_prompts(b, c, eng.config.model.vocab_size, 7)]
    reqs = [eng.groups[i][0] for i in ids]
    while any(not r.output_token_ids for r in reqs):
        eng.step()
    for _ in range(6):
        eng.step()
    torch.cuda.synchronize()
    ts = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    for i in ids:
        eng.abort_request(i)
    while eng.has_unfinished_requests():
        eng.step()
    rows = []
    for e in pr.key_averages():
        dev = getattr(e, "device_time_total", 0) or 0
        rows.append((e.key[:60], e.count / steps, e.self_cpu_time_total / steps, dev / steps))
    print(f"--- B{b}x{c} {s}: step median {statistics.median(ts)*1e3:.3f} ms", flush=True)
    for r in sorted(rows, key=lambda r: -(r[2] + r[3]))[:28]:
        print("  %-60s x%-6.2f cpu %8.1f us  dev %8.1f us" % r)

for s in ({"temperature": 0.0}, SAMPLED):
    prof(8, 8192, s)
