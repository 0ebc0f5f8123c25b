"""Issue 18, on a GPU (`PYTHONPATH=. python3 benchmarks/sampled_delta.py`): where the time that sampled
requests add to a decode step over greedy ones goes. TPOT and graph replay of five sampling variants
alternated at three seed000 points, then a torch.profiler table of real async steps, greedy and sampled."""
import statistics

from step_profile import profile_steps

from fapool import LLM
from fapool.bench.tpot import SAMPLED, measure_engine

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
        print(f"B{b}x{c} {k:12s} tpot/replay", " ".join("{:.3f}/{:.3f}".format(*t) for t in v),
              "med tpot {:.3f}".format(statistics.median(t[0] for t in v)), flush=True)

for s in ({"temperature": 0.0}, SAMPLED):
    profile_steps(eng, 8, 8192, s, str(s), rows_shown=28)
