import cProfile, pstats, time, torch
from fapool.entrypoints.llm import LLM
from fapool.bench.tpot import random_prompts
from fapool.sampling_params import SamplingParams
llm = LLM("preset:seed000", device="cuda", max_model_len=32769, max_num_batched_tokens=16384, max_num_seqs=1,
          enable_prefix_caching=False, gpu_memory_utilization=0.9)
p = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
V = llm.engine.config.model.vocab_size
for i in range(2):
    llm.generate([{"prompt_token_ids": random_prompts(1, 32768, V, seed=5 + i)[0]}], p)
prompt = random_prompts(1, 32768, V, seed=9)[0]
torch.cuda.synchronize()
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
llm.generate([{"prompt_token_ids": prompt}], p)
torch.cuda.synchronize()
pr.disable()
print("wall", time.perf_counter() - t)
st = pstats.Stats(pr)
st.sort_stats("tottime").print_stats(22)
st.sort_stats("cumulative").print_stats(35)
llm.shutdown()
