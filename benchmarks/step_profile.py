"""A torch.profiler table (host and device time per step) of real async decode steps on a GPU,
shared by the issue-18 probes (sampled_delta.py, penalised_trace.py): `batch` prompts of
`context` tokens with `sampling`, prefilled and stepped 6 times, then `steps` profiled steps."""
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fapool import SamplingParams
from fapool.bench.tpot import random_prompts
from fapool.sampling_params import RequestOutputKind


def profile_steps(eng, batch: int, context: int, sampling: dict, label: str, steps: int = 24,
                  trace_path: str | None = None, rows_shown: int = 30) -> None:
    params = SamplingParams(**sampling, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [eng.add_request(x, params) for x in random_prompts(batch, context, eng.config.model.vocab_size, 7)]
    reqs = [eng.groups[i][0] for i in ids]
    while any(not r.output_token_ids for r in reqs):
        eng.step()
    for _ in range(6):
        eng.step()
    torch.cuda.synchronize()
    times = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    for i in ids:
        eng.abort_request(i)
    while eng.has_unfinished_requests():
        eng.step()
    if trace_path:
        pr.export_chrome_trace(trace_path)
    rows = []
    for e in pr.key_averages():
        dev = getattr(e, "device_time_total", 0) or 0
        rows.append((e.key[:60], e.count / steps, e.self_cpu_time_total / steps, dev / steps))
    print(f"--- {label} B{batch}x{context}: step median {statistics.median(times) * 1e3:.3f} ms", flush=True)
    for r in sorted(rows, key=lambda r: -(r[2] + r[3]))[:rows_shown]:
        name, count, cpu_us, dev_us = r
        print(f"  {name:<60s} x{count:<6.2f} cpu {cpu_us:8.1f} us  dev {dev_us:8.1f} us")
