"""Issue 18, on a GPU (`PYTHONPATH=<a fapool tree> python3 benchmarks/penalised_trace.py [TAG] [OUT] [prof|noprof]`):
where penalised requests' extra decode-step time goes. Greedy and penalised seed000 points alternated
(8x512 is visited first and again last, to tell a cost of the point from one of the order), then a
torch.profiler table (host and device) of real async penalised steps at B8 x 512, and its chrome trace
under OUT when given. Runs against any fapool tree with bench.tpot's measure_engine(sampling=)."""
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fapool import LLM, SamplingParams
from fapool.bench.tpot import PENALISED, measure_engine, random_prompts
from fapool.sampling_params import RequestOutputKind

tag = sys.argv[1] if len(sys.argv) > 1 else "tree"
out = sys.argv[2] if len(sys.argv) > 2 else None
llm = LLM("preset:seed000", gpu_memory_utilization=0.6, max_num_seqs=64, max_num_batched_tokens=16384)
eng = llm.engine
measure_engine(eng, 2, 64, 4)
GREEDY = {"temperature": 0.0}
for b, c in [(8, 512), (16, 512), (8, 2048), (64, 512), (8, 512)][: int(os.environ.get("PEN_POINTS", 5))]:
    g = [measure_engine(eng, b, c, 32, sampling=GREEDY) for _ in range(2)]
    p = [measure_engine(eng, b, c, 32, sampling=PENALISED) for _ in range(2)]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(
        f"[{tag}] B{b}x{c} greedy tpot {' '.join('%.3f' % r['tpot_ms'] for r in g)} sync "
        f"{' '.join('%.3f' % r['tpot_sync_ms'] for r in g)} | penalised tpot "
        f"{' '.join('%.3f' % r['tpot_ms'] for r in p)} sync {' '.join('%.3f' % r['tpot_sync_ms'] for r in p)}"
        f" | x{med(p, 'tpot_ms') / med(g, 'tpot_ms'):.3f}",
        flush=True,
    )


def prof(b, c, s, steps=24):
    sp = SamplingParams(**s, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [eng.add_request(x, sp) for x in random_prompts(b, c, eng.config.model.vocab_size, 7)]
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
    name = "greedy" if s.get("temperature") == 0.0 else "penalised"
    if out:
        pr.export_chrome_trace(os.path.join(out, f"pen_trace-{tag}-{name}.json"))
    rows = []
    for e in pr.key_averages():
        dev = getattr(e, "device_time_total", 0) or 0
        rows.append((e.key[:60], e.count / steps, e.self_cpu_time_total / steps, dev / steps))
    print(f"--- [{tag}] B{b}x{c} {name}: step median {statistics.median(ts) * 1e3:.3f} ms", flush=True)
    for r in sorted(rows, key=lambda r: -(r[2] + r[3]))[:30]:
        print("  %-60s x%-6.2f cpu %8.1f us  dev %8.1f us" % r)


if (sys.argv[3] if len(sys.argv) > 3 else "prof") == "prof":
    prof(8, 512, PENALISED)
    if tag == "head":
        prof(8, 512, GREEDY)
