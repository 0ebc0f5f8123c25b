import itertools, json, os, statistics, torch
from fapool.attention import AttentionMetadata
from fapool.attention import triton_decode as td
H, HKV, D, PAGE, LAYERS = 32, 32, 128, 16, 4
dev, bf16 = "cuda", torch.bfloat16
def time_graph(fn, calls=20, reps=10):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3): fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls): fn(i)
    ts = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts[2:])
rows = []
for B, L in itertools.product((8, 16, 32, 64), (512, 2048)):
    nb = B * (L // PAGE + 1)
    caches = [(torch.randn(nb, PAGE, HKV, D, dtype=bf16, device=dev), torch.randn(nb, PAGE, HKV, D, dtype=bf16, device=dev)) for _ in range(LAYERS)]
    perm = torch.randperm(nb).tolist()
    tables = [perm[b * (L // PAGE + 1):(b + 1) * (L // PAGE + 1)] for b in range(B)]
    meta = AttentionMetadata.build([1] * B, [L] * B, [L + 1] * B, tables, [-1] * B, device=dev)
    q = torch.randn(B, H, D, dtype=bf16, device=dev)
    out = torch.empty_like(q); lse = torch.empty(B, H, dtype=torch.float32, device=dev)
    kv_bytes = B * (L + 1) * HKV * D * 2 * 2
    auto = td.auto_num_splits(B, HKV, L + 1, D, 2, q.device)
    base = time_graph(lambda i: td.paged_decode(q, *caches[i % LAYERS], meta, 0.1, out, lse, num_splits=auto))
    best = (base, "default", auto)
    for bn, st, sp in itertools.product((32, 64, 128), (2, 3, 4), (1, 2, 3, 4, 6, 8)):
        try:
            t = time_graph(lambda i: td.paged_decode(q, *caches[i % LAYERS], meta, 0.1, out, lse, num_splits=sp, block_n=bn, num_stages=st))
        except Exception as e:
            continue
        if t < best[0]: best = (t, f"bn{bn} st{st}", sp)
    r = dict(B=B, L=L, default_us=base, default_splits=auto, default_TBps=kv_bytes / base / 1e6, best_us=best[0], best=best[1], best_splits=best[2], best_TBps=kv_bytes / best[0] / 1e6)
    rows.append(r); print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_decode.json"), "w"), indent=1)
