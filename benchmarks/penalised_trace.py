"""Issue 18, on a GPU (`PYTHONPATH=<a fapool tree> python3 benchmarks/penalised_trace.py [TAG] [OUT] [prof|noprof]`):
where penalised requests' extra decode-step time goes. Greedy and penalised seed000 points alternated
(8x512 is visited first and again last, to tell a cost of the point from one of the order), then a
torch.profiler table (host and device) of real async penalised steps at B8 x 512, and its chrome trace
under OUT when given. Runs against any fapool tree with bench.tpot's measure_engine(sampling=)."""
import os
import statistics
import sys

from step_profile import profile_steps

from fapool import LLM
from fapool.bench.tpot import PENALISED, measure_engine

tag = sys.argv[1] if len(sys.argv) > 1 else "tree"
out = sys.argv[2] if len(sys.argv) > 2 else None
llm = LLM("preset:seed000", gpu_memory_utilization=0.6, max_num_seqs=64, max_num_batched_tokens=16384)
eng = llm.engine
measure_engine(eng, 2, 64, 4)
GREEDY = {"temperature": 0.0}
for b, c in [(8, 512), (16, 512), (8, 2048), (64, 512), (8, 512)][: int(os.environ.get("PEN_POINTS", "5"))]:
    g = [measure_engine(eng, b, c, 32, sampling=GREEDY) for _ in range(2)]
    p = [measure_engine(eng, b, c, 32, sampling=PENALISED) for _ in range(2)]
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    print(
        f"[{tag}] B{b}x{c} greedy tpot {' '.join('{:.3f}'.format(r['tpot_ms']) for r in g)} sync "
        f"{' '.join('{:.3f}'.format(r['tpot_sync_ms']) for r in g)} | penalised tpot "
        f"{' '.join('{:.3f}'.format(r['tpot_ms']) for r in p)} sync {' '.join('{:.3f}'.format(r['tpot_sync_ms']) for r in p)}"
        f" | x{med(p, 'tpot_ms') / med(g, 'tpot_ms'):.3f}",
        flush=True,
    )


def prof(b, c, s):
    name = "greedy" if s.get("temperature") == 0.0 else "penalised"
    trace = os.path.join(out, f"pen_trace-{tag}-{name}.json") if out else None
    profile_steps(eng, b, c, s, f"[{tag}] {name}", trace_path=trace)


if (sys.argv[3] if len(sys.argv) > 3 else "prof") == "prof":
    prof(8, 512, PENALISED)
    if tag == "head":
        prof(8, 512, GREEDY)
