import time, torch
from torch.profiler import profile, ProfilerActivity
from fapool.entrypoints.llm import LLM
from fapool.bench.tpot import random_prompts
from fapool.sampling_params import SamplingParams
llm = LLM("preset:seed000", device="cuda", max_model_len=32769, max_num_batched_tokens=16384, max_num_seqs=1,
          enable_prefix_caching=False, gpu_memory_utilization=0.9)
p = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
V = llm.engine.config.model.vocab_size
llm.generate([{"prompt_token_ids": random_prompts(1, 32768, V, seed=5)[0]}], p)
for i in range(2):
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate([{"prompt_token_ids": random_prompts(1, 32768, V, seed=6 + i)[0]}], p)
    torch.cuda.synchronize(); print("ttft", time.perf_counter() - t, flush=True)
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate([{"prompt_token_ids": random_prompts(1, 32768, V, seed=9)[0]}], p)
    torch.cuda.synchronize(); print("ttft profiled", time.perf_counter() - t, flush=True)
ev = prof.key_averages()
gpu = sorted([(e.device_time_total, e.count, e.key) for e in ev if e.device_time_total > 0 and not e.key.startswith("aten::")], reverse=True)
tot = sum(g[0] for g in gpu)
print("gpu kernel total ms", tot / 1e3)
for t, c, k in gpu[:25]:
    print("%9.1f us x%-4d %s" % (t, c, k[:110]))
llm.shutdown()
