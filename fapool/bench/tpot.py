"""`fapool bench tpot`: decode TPOT against context length, beside HF transformers and the roofline.

Three parts, measured in one process on one GPU so the ratios hold:

1. The seed 000 preset (4 layers, hidden 4096, 32 heads, FFN 16384, non-gated GELU, bf16, random
   weights) over batch x context, against the roofline: (bytes of weights + bytes of KV read
   per step) / the device copy bandwidth measured in the same run. Also its KV capacity at
   gpu_memory_utilization 0.9 and the KV utilisation while decoding (seed 001's waste measure),
   the GPU-only time of a step (graph replay), and A/B points without fused kernels and without
   CUDA graphs.
2. Against HF generate (sdpa): transformers has no non-gated GELU Llama, so both engines run
   the *gated* twin that bench/anchors.py times (LlamaConfig with hidden_act "gelu": the same
   dims plus a gate projection), with identical random weights copied from the HF model.
3. SmolLM2-135M's shape (random weights; the embedded GGUF is 98 MB, more than the device
   tool carries): throughput of fapool and HF generate on the same prompts.

TPOT here is the wall time of an engine step during steady decode (every request past its
prompt), median over `--decode-steps` steps: scheduler, graph replay, sampling and output
processing included, with async scheduling (host work of step n+1 overlapped with the GPU's
step n); `tpot_sync_ms` is the same batch with it off. HF's is (generate(1 + n) - generate(1)) / n,
as bench/anchors.py does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

import torch

from fapool.bench.results import environment, write_result
from fapool.sampling_params import RequestOutputKind, SamplingParams

SEED_GATED = {
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "hidden_act": "gelu",
}
SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second (2 GiB bf16, median of 20)."""
    x = torch.randn(1024**3, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    times = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e))
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / (statistics.median(times) / 1e3)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of parameters a decode step reads: everything but the embedding table (a step
    reads only its rows), the lm_head once even when tied."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    if model.lm_head.weight is embed:
        total += embed.numel() * embed.element_size()
    return total


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def profile_replay(graphs, replays: int = 5) -> list[dict[str, Any]]:
    """GPU time per replay of the last step's graph, by kernel name (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    graph, _ = graphs.graphs[graphs.last_key]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type.name != "CUDA" or not e.count:
            continue
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        rows.append(
            {"kernel": e.key[:90], "us_per_step": total / replays, "calls_per_step": e.count / replays}
        )
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}  # the sampled rows of --sampled
# --penalised: the same draws with the penalties chat clients send (their logits are edited
# between the forward pass and the draw)
PENALISED = {**SAMPLED, "repetition_penalty": 1.1, "presence_penalty": 0.3, "frequency_penalty": 0.3}
VARIANTS = {
    "sampled": ("sampled (T 0.8, top-p 0.95)", SAMPLED),
    "penalised": ("penalised (+ repetition, presence, frequency)", PENALISED),
}


def measure_engine(
    engine,
    batch: int,
    context: int,
    steps: int,
    warmup: int = 4,
    profile: bool = False,
    sampling: dict | None = None,  # SamplingParams fields; default greedy
) -> dict[str, Any]:
    """Prefill `batch` prompts of `context` tokens, then time `steps` decode steps of the whole
    batch (max_tokens leaves room for the tokens early requests decode while later ones are
    still in prefill, so no request finishes inside the timed windows).

    With async scheduling on, the steps are timed as they run (host work overlapped with the
    GPU), then the same batch is timed for `steps` more with async scheduling off, where the
    runner is synced after each step to split the step into runner and engine host time."""
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_steps = -(-batch * context // budget) + 1
    params = SamplingParams(
        **(sampling or {"temperature": 0.0}),
        max_tokens=4 + warmup + 2 * steps + prefill_steps,
        ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,  # as LLM.generate: no output built for the steps between
    )
    prompts = random_prompts(batch, context, engine.config.model.vocab_size, seed=batch * 1_000_003 + context)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.groups[i][0] for i in ids]
    t0 = time.perf_counter()
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(warmup):
        engine.step()
    use_async = engine.async_scheduling
    async_times = []
    if use_async:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            async_times.append(time.perf_counter() - t)
        engine.async_scheduling = False
        engine.step()  # drains the step in flight
    runner = engine.executor.runner
    execute, exec_times = runner.execute, []

    def timed_execute(out):  # runner time: input preparation + the GPU step (synced)
        t = time.perf_counter()
        result = execute(out)
        torch.cuda.synchronize()
        exec_times.append(time.perf_counter() - t)
        return result

    runner.execute = timed_execute
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    finally:
        del runner.execute
        engine.async_scheduling = use_async
    stats = engine.stats()
    graph_ms = None
    graphs = runner.decode_graphs if runner.use_cuda_graphs else None
    if graphs is not None and graphs.last_key is not None:
        graph_ms = graphs.time_replay(*graphs.last_key)  # the buffers still hold the last step
    kernels = None
    if profile and graph_ms:
        try:
            kernels = profile_replay(graphs)
        except Exception as e:  # noqa: BLE001 -- a diagnostic: never lose the run to the profiler
            kernels = [
                {
                    "kernel": f"profiler failed: {type(e).__name__}: {e}"[:200],
                    "us_per_step": 0,
                    "calls_per_step": 0,
                }
            ]
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    sync_ms, exec_ms = statistics.median(times) * 1e3, statistics.median(exec_times) * 1e3
    step_ms = statistics.median(async_times) * 1e3 if use_async else sync_ms
    return {
        "batch": batch,
        "context": context,
        "async_scheduling": use_async,
        "tpot_ms": step_ms,
        "tpot_mean_ms": statistics.fmean(async_times or times) * 1e3,
        "tpot_sync_ms": sync_ms,  # async scheduling off, the steps after the timed ones
        "graph_replay_ms": graph_ms,
        "runner_ms": exec_ms,  # sync steps: prepare + GPU
        "engine_host_ms": sync_ms - exec_ms,  # sync steps: schedule + sample + outputs
        "runner_host_ms": exec_ms - graph_ms if graph_ms else None,
        "prefill_s": prefill_s,
        "num_running": stats.num_running,
        "kv_tokens_read": batch * (context + 1 + warmup + steps / 2),  # mean context, first timed steps
        "kv_utilisation": stats.kv_utilisation,
        "kv_blocks_used": stats.kv_blocks_used,
        **({"kernel_profile": kernels} if kernels else {}),
    }


def add_roofline(row: dict, weight_bytes: int, kv_bytes_per_token: int, copy_bps: float) -> dict:
    step_bytes = weight_bytes + row["kv_tokens_read"] * kv_bytes_per_token
    row["roofline_ms"] = step_bytes / copy_bps * 1e3
    row["x_roofline"] = row["tpot_ms"] / row["roofline_ms"]
    if row.get("graph_replay_ms"):
        row["graph_x_roofline"] = row["graph_replay_ms"] / row["roofline_ms"]
    return row


def engine_from_hf(hf_model, **engine_kwargs):
    """A fapool engine over the same weights as a transformers Llama already on the GPU."""
    from fapool.attention.selector import make_backend
    from fapool.engine.arg_utils import EngineArgs
    from fapool.engine.llm_engine import LLMEngine
    from fapool.models.hf_loader import config_from_dict
    from fapool.models.registry import build_model
    from fapool.worker.model_runner import DTYPES

    model_config = config_from_dict(hf_model.config.to_dict())
    config = EngineArgs(**engine_kwargs).create_engine_config(model_config)
    backend = make_backend(config.attention_backend, config.device)
    model = build_model(model_config, backend, DTYPES[config.dtype], config.device)
    model.load_weights((k, v) for k, v in hf_model.state_dict().items())
    if config.sparse_attention:  # as fapool.entrypoints.llm.build_engine does
        from fapool.attention.sparse import enable_sparse_attention

        backend = enable_sparse_attention(model, backend, config.sparse_attention, config.sparse_min_context)
    return LLMEngine(config, model.eval(), backend)


def hf_model(spec: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**spec, attn_implementation="sdpa")).to(torch.bfloat16).eval()
    return model


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - t


def hf_tpot(model, batch: int, context: int, steps: int, vocab: int) -> dict[str, Any]:
    prompts = random_prompts(batch, context, vocab, 0)
    hf_generate_s(model, prompts[:1], 2)
    t1 = min(hf_generate_s(model, prompts, 1) for _ in range(2))
    tn = min(hf_generate_s(model, prompts, 1 + steps) for _ in range(2))
    return {"batch": batch, "context": context, "ttft_ms": t1 * 1e3, "tpot_ms": (tn - t1) / steps * 1e3}


def _free_gpu() -> None:
    """Return freed engines' memory (the KV cache is most of the card) before the next part."""
    gc.collect()
    torch.cuda.empty_cache()


def _points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in text.split(",") if p]  # type: ignore[misc]


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from fapool.entrypoints.llm import LLM
    from fapool.layers.fused import fuse_model, unfuse_model

    res: dict[str, Any] = {"env": environment("cuda"), "timing": __doc__.split("\n\n")[-1].strip()}
    res["copy_TBps"] = copy_bw = copy_bandwidth() / 1e12
    print(f"{res['env']['device']}: copy {copy_bw:.2f} TB/s", flush=True)
    copy_bps = copy_bw * 1e12
    batches = [int(b) for b in ns.batches.split(",")]
    contexts = [int(c) for c in ns.contexts.split(",")]
    steps = ns.decode_steps

    # 1. seed 000 preset ---------------------------------------------------------------------
    llm = LLM(
        "preset:seed000",
        gpu_memory_utilization=0.9,
        max_num_seqs=max(batches),
        max_num_batched_tokens=ns.max_num_batched_tokens,
    )
    engine = llm.engine
    mc = engine.config.model
    kv_per_token = mc.kv_bytes_per_token(2)
    wbytes = weight_bytes_per_step(engine.executor.runner.model)
    capacity = engine.num_kv_blocks * engine.config.cache.block_size
    seed = {
        "model": "preset:seed000",
        "shape": {
            "layers": mc.num_hidden_layers,
            "hidden": mc.hidden_size,
            "heads": mc.num_attention_heads,
            "kv_heads": mc.num_key_value_heads,
            "ffn": mc.intermediate_size,
            "act": mc.hidden_act,
            "gated": mc.gated_mlp,
            "dtype": engine.config.dtype,
            "block_size": engine.config.cache.block_size,
        },
        "weight_bytes_per_step": wbytes,
        "kv_bytes_per_token": kv_per_token,
        "kv_capacity_tokens_at_0.9": capacity,
        "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory,
        "rows": [],
        "ab": [],
    }
    print(f"seed000: KV capacity {capacity} tokens at gpu_memory_utilization 0.9", flush=True)
    measure_engine(engine, 2, 64, 4)  # warm-up: compiles the kernels
    for context in contexts:
        for batch in batches:
            if batch * (context + steps + 64) > capacity:
                seed["rows"].append({"batch": batch, "context": context, "skipped": "exceeds KV capacity"})
                continue
            prof = (batch, context) in _points(ns.profile_points)
            row = add_roofline(
                measure_engine(engine, batch, context, steps, profile=prof), wbytes, kv_per_token, copy_bps
            )
            for name, (_, sampling) in VARIANTS.items():  # the same point, right after the greedy one
                if not getattr(ns, name):
                    continue
                other = add_roofline(
                    measure_engine(engine, batch, context, steps, profile=prof, sampling=sampling),
                    wbytes,
                    kv_per_token,
                    copy_bps,
                )
                keep = ("tpot_ms", "tpot_sync_ms", "graph_replay_ms", "x_roofline", "kernel_profile")
                row[name] = {k: other[k] for k in keep if k in other}
                row[name]["x_greedy"] = other["tpot_ms"] / row["tpot_ms"]
            seed["rows"].append(row)
            res["seed000"] = seed
            _checkpoint(res, ns)  # each point kept if a later one or the command's limit cuts the run short
            print("seed000", _short(row), flush=True)
            for k in row.get("kernel_profile", [])[:12]:
                print(f"    {k['us_per_step']:9.1f} us  x{k['calls_per_step']:<4g} {k['kernel']}", flush=True)
    runner = engine.executor.runner
    for batch, context in _points(ns.ab_points):
        base = next(
            (r for r in seed["rows"] if r["batch"] == batch and r["context"] == context and "tpot_ms" in r),
            None,
        )
        unfuse_model(runner.model)
        runner.decode_graphs = None
        unfused = add_roofline(measure_engine(engine, batch, context, steps), wbytes, kv_per_token, copy_bps)
        fuse_model(runner.model)
        runner.decode_graphs = None
        runner.use_cuda_graphs = False
        eager = add_roofline(
            measure_engine(engine, batch, context, min(steps, 16)), wbytes, kv_per_token, copy_bps
        )
        runner.use_cuda_graphs = True
        ab = {
            "batch": batch,
            "context": context,
            "fused_graphs_tpot_ms": base and base["tpot_ms"],
            "unfused_graphs_tpot_ms": unfused["tpot_ms"],
            "unfused_graph_replay_ms": unfused["graph_replay_ms"],
            "fused_graph_replay_ms": base and base["graph_replay_ms"],
            "fused_eager_tpot_ms": eager["tpot_ms"],
        }
        seed["ab"].append(ab)
        print("A/B", ab, flush=True)
    res["seed000"] = seed
    _checkpoint(res, ns)
    del llm, engine, runner
    _free_gpu()

    # 2. gated twin against HF generate --------------------------------------------------------
    if ns.hf:
        points = _points(ns.hf_points)
        hf = hf_model(SEED_GATED, 0)
        eng = engine_from_hf(
            hf,
            gpu_memory_utilization=0.9,
            max_num_seqs=max(b for b, _ in points),
            max_num_batched_tokens=ns.max_num_batched_tokens,
        )
        wb, kvt = weight_bytes_per_step(eng.executor.runner.model), eng.config.model.kv_bytes_per_token(2)
        measure_engine(eng, 2, 64, 4)
        rows = []
        for batch, context in points:
            rows.append(
                {"fapool": add_roofline(measure_engine(eng, batch, context, steps), wb, kvt, copy_bps)}
            )
            print("gated fapool", _short(rows[-1]["fapool"]), flush=True)
        del eng
        _free_gpu()
        for row, (batch, context) in zip(rows, points):
            try:
                row["hf"] = hf_tpot(hf, batch, context, ns.hf_steps, SEED_GATED["vocab_size"])
                row["speedup_tpot"] = row["hf"]["tpot_ms"] / row["fapool"]["tpot_ms"]
            except torch.OutOfMemoryError as e:
                row["hf"] = {"batch": batch, "context": context, "error": f"OOM: {str(e)[:120]}"}
                _free_gpu()
            print("gated HF", row.get("hf"), "x", round(row.get("speedup_tpot") or 0, 2), flush=True)
        res["seed000_gated_vs_hf"] = {
            "model": "LlamaConfig("
            + ", ".join(f"{k}={v}" for k, v in SEED_GATED.items())
            + "), random bf16 weights shared by both engines",
            "weight_bytes_per_step": wb,
            "rows": rows,
        }
        _checkpoint(res, ns)
        del hf
        _free_gpu()

    # 3. SmolLM2-135M shape: throughput ----------------------------------------------------------
    if ns.smollm2:
        hf = hf_model(SMOLLM2, 1)
        out: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct shape, random bf16 weights (the GGUF is too large "
            "to carry to the device)",
            "input_len": ns.smol_input,
            "output_len": ns.smol_output,
            "rows": [],
        }
        eng = engine_from_hf(
            hf,
            gpu_memory_utilization=0.5,
            max_num_seqs=max(_ints(ns.smol_prompts)),
            max_num_batched_tokens=8192,
        )
        measure_engine(eng, 2, 64, 4)
        for n in _ints(ns.smol_prompts):
            prompts = random_prompts(n, ns.smol_input, SMOLLM2["vocab_size"], 3)
            params = SamplingParams(temperature=0.0, max_tokens=ns.smol_output, ignore_eos=True)
            t = time.perf_counter()
            for p in prompts:
                eng.add_request(p, params)
            while eng.has_unfinished_requests():
                eng.step()
            ours = n * ns.smol_output / (time.perf_counter() - t)
            hf_generate_s(hf, prompts[:2], 2)
            hf_s = hf_generate_s(hf, prompts, ns.smol_output)
            row = {"num_prompts": n, "fapool_tok_s": ours, "hf_tok_s": n * ns.smol_output / hf_s}
            row["speedup"] = row["fapool_tok_s"] / row["hf_tok_s"]
            out["rows"].append(row)
            print("smollm2", row, flush=True)
        res["smollm2"] = out
        del eng, hf
        _free_gpu()
    return res


def _checkpoint(res: dict, ns: argparse.Namespace) -> None:
    """Write what is measured so far (a later part failing keeps the earlier ones)."""
    if ns.out_dir:
        os.makedirs(ns.out_dir, exist_ok=True)
        with open(os.path.join(ns.out_dir, "tpot_partial.json"), "w") as f:
            json.dump(res, f, indent=1)


def plot(res: dict, out_dir: str) -> list[str]:
    """TPOT vs context per batch (fapool, roofline, HF on the gated twin), and the GPU-only step
    time's fraction of the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in res["seed000"]["rows"] if "tpot_ms" in r]
    batches = sorted({r["batch"] for r in rows})
    gated = res.get("seed000_gated_vs_hf", {}).get("rows", [])
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        ax.plot(ctx, [r["tpot_ms"] for r in rs], "-o", color="C0", label="fapool seed000, engine step")
        if all(r.get("tpot_sync_ms") for r in rs) and any(r.get("async_scheduling") for r in rs):
            ax.plot(
                ctx, [r["tpot_sync_ms"] for r in rs], "-x", color="C1", alpha=0.7, label="fapool, async scheduling off"
            )
        ax.plot(
            ctx,
            [r["graph_replay_ms"] for r in rs],
            "--.",
            color="C0",
            alpha=0.6,
            label="fapool, GPU only (graph)",
        )
        ax.plot(
            ctx, [r["roofline_ms"] for r in rs], ":", color="gray", label="roofline (weights+KV / copy bw)"
        )
        g = sorted((x for x in gated if x["fapool"]["batch"] == b), key=lambda x: x["fapool"]["context"])
        if g:
            ax.plot(
                [x["fapool"]["context"] for x in g],
                [x["fapool"]["tpot_ms"] for x in g],
                "-s",
                color="C2",
                label="fapool, gated twin",
            )
            hf = [x for x in g if "tpot_ms" in x.get("hf", {})]
            ax.plot(
                [x["hf"]["context"] for x in hf],
                [x["hf"]["tpot_ms"] for x in hf],
                "-^",
                color="C3",
                label="HF generate (sdpa), gated twin",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ctx, [f"{c // 1024}K" if c >= 1024 else str(c) for c in ctx])
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("TPOT (ms)")
    axes[0][-1].legend(fontsize=6)
    env = res["env"]
    fig.suptitle(
        f"decode TPOT — {env['device']}, {env['date'][:10]}, {env['commit']}, copy {res['copy_TBps']:.2f} TB/s",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tpot_vs_context.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _short(row: dict) -> dict:
    keys = (
        "batch",
        "context",
        "tpot_ms",
        "tpot_sync_ms",
        "graph_replay_ms",
        "roofline_ms",
        "x_roofline",
        "engine_host_ms",
        "runner_host_ms",
        "num_running",
        "kv_utilisation",
    )
    short = {k: (round(row[k], 3) if isinstance(row.get(k), float) else row.get(k)) for k in keys}
    for name in VARIANTS:
        if name in row:
            short[f"{name}_x_greedy"] = round(row[name]["x_greedy"], 3)
    return short


def summary(res: dict) -> str:
    rows = [r for r in res["seed000"]["rows"] if "tpot_ms" in r]
    worst = max(rows, key=lambda r: r["x_roofline"]) if rows else None
    text = (
        f"seed000 TPOT {len(rows)} points, x roofline {min(r['x_roofline'] for r in rows):.2f}-{worst['x_roofline']:.2f}"
        if rows
        else "no seed000 rows"
    )
    for name, (label, _) in VARIANTS.items():
        ratios = [r[name]["x_greedy"] for r in rows if name in r]
        if ratios:
            text += f"; {label} TPOT x{min(ratios):.3f}-{max(ratios):.3f} greedy"
    gated = res.get("seed000_gated_vs_hf", {}).get("rows", [])
    sp = [r["speedup_tpot"] for r in gated if r.get("speedup_tpot")]
    if sp:
        text += f"; gated twin TPOT x{min(sp):.1f}-{max(sp):.1f} faster than HF generate"
    smol = res.get("smollm2", {}).get("rows", [])
    if smol:
        text += "; SmolLM2 shape throughput " + ", ".join(
            f"x{r['speedup']:.1f} HF at {r['num_prompts']} prompts" for r in smol
        )
    return text + f"; KV capacity {res['seed000']['kv_capacity_tokens_at_0.9']} tokens at 0.9"


def main(ns: argparse.Namespace) -> int:
    if ns.plot:
        with open(ns.plot) as f:
            res = json.load(f)
        print("wrote", *plot(res, ns.plot_dir))
        return 0
    res = run(ns)
    text = summary(res)
    print(text)
    if not ns.no_save:
        print("wrote", write_result("tpot", res, text, out_dir=ns.out_dir))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tpot", help="decode TPOT vs context: seed000 preset vs roofline and HF generate (GPU)"
    )
    p.add_argument("--batches", default="8,16,32,64")
    p.add_argument("--contexts", default="512,2048,8192,16384")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument(
        "--ab-points", default="8x512,64x2048", help="BxL points re-run unfused and without graphs"
    )
    p.add_argument(
        "--profile-points", default="8x512,8x16384", help="BxL points whose graph replay is profiled"
    )
    p.add_argument(
        "--sampled",
        action="store_true",
        help="also time every seed000 point with sampled requests (temperature 0.8, top-p 0.95, seeded)",
    )
    p.add_argument(
        "--penalised",
        action="store_true",
        help="also time every seed000 point with sampled requests that add repetition 1.1, presence 0.3 "
        "and frequency 0.3 penalties",
    )
    p.add_argument("--no-hf", dest="hf", action="store_false")
    p.add_argument("--hf-points", default="8x512,8x2048,8x8192,8x16384,32x2048,64x512")
    p.add_argument("--hf-steps", type=int, default=32)
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false")
    p.add_argument("--smol-prompts", default="64,256")
    p.add_argument("--smol-input", type=int, default=128)
    p.add_argument("--smol-output", type=int, default=128)
    p.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--plot", default=None, help="only draw the plot from a results JSON (no GPU)")
    p.add_argument("--plot-dir", default=os.path.join("benchmarks", "plots"))
    p.set_defaults(func=main)
