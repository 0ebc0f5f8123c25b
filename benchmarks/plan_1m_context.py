"""A 1M-token context on H200s, on paper (SIMULATED): FA Pool layouts for a Llama-3-8B shape.

For each context (128K, 256K, 1M tokens), batch (1, 4, 16) and dense base (TP1, TP2, TP8) it
computes:
  * KV bytes per sequence and in all; the attention pool size P: the fewest H200s whose KV
    budget (the preset's kv_budget_bytes: 90% of HBM less 2 GB reserved) holds the batch's KV
    (threshold 0: every KV token on the pool, the base holds only weights);
  * memory per GPU: weights per base GPU, the busiest pool GPU's KV (placed by the simulator's
    PoolLedger, i.e. the engine's PoolManager in shard mode, segments of `--chunk` tokens) and
    its headroom;
  * predicted TPOT, composed from the simulator's CostModel and FAPool.step_time: per layer the
    base's dense work, each pool GPU's attention over its own KV, the exchange of queries (+ the
    new token's K/V) out and (out, lse) back over NVLink for pool GPUs in the base's node and
    InfiniBand for the others (8 GPUs a node, base first), the LSE merge, the LM head; two
    micro-batches ping-pong when the batch has two sequences or more;
  * a cross-check: the discrete-event simulator (`simulate`, FAPool, 32 decode steps), which
    prices every pool link as one class (InfiniBand once the instance spans nodes);
  * the HBM roofline of the GPUs holding the data: KV bytes / (P x 4.8 TB/s) + weight bytes /
    (base GPUs x 4.8 TB/s), and predicted / roofline;
  * at 1M, the TPOT again with the inter-node latency set to seed 004's measured 33.0 us
    (its host-bypassed stack) and 66.6 us (NCCL), and with twice the pool GPUs.

Nothing here ran on a GPU. Figures come from the h200 preset (fapool/sim/hardware.py) and the
public specs named in ASSUMPTIONS.

    PYTHONPATH=. .venv/bin/python benchmarks/plan_1m_context.py [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fapool.bench.results import environment, repo_root, write_result
from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.hardware import HardwareProfile, LinkProfile, get_hardware
from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import FAPool
from fapool.sim.workload import LengthDist, PoissonWorkload

CONFIG = Path(__file__).parent / "configs" / "llama3_8b.json"
HBM_PEAK = 4.8e12  # NVIDIA H200 datasheet (SXM): HBM3e 4.8 TB/s, 141 GB
ASSUMPTIONS = {
    "hbm_peak_bytes_s": "4.8e12 (NVIDIA H200 datasheet, H200 SXM HBM3e), the roofline's rate",
    "hbm_bytes": "141e9 (NVIDIA H200 datasheet); usable for weights + KV: preset kv_budget_bytes "
    "= 0.9 x 141 GB - 2 GB reserved = 124.9 GB",
    "nvlink": "NVLink 4 (NVIDIA H200 datasheet / HGX H200): 900 GB/s bidirectional = 450 GB/s a "
    "direction; preset intra_node: 0.8 x 450 GB/s = 360 GB/s effective, 8 us a message",
    "infiniband": "one ConnectX-7 NDR 400 Gb/s NIC per GPU (NVIDIA ConnectX-7 NDR) = 50 GB/s a "
    "direction; preset inter_node: 0.8 x 50 GB/s = 40 GB/s effective, 15 us a message",
    "node": "8 GPUs per HGX node; the base's GPUs first, then pool GPUs fill its node, then further nodes",
    "efficiencies": "preset: decode attention 0.75 of HBM (3.6 TB/s), memory-bound GEMMs 0.80 (3.84 TB/s), "
    "GEMM 0.70 of 989 TFLOP/s",
    "latency_sensitivity": "seed 004 (Lamina, arXiv 2405.01814, section 6.3): end-to-end latency 33.0 us "
    "(its fully host-bypassed stack) vs 66.6 us (NCCL)",
    "placement": "threshold 0 (all KV on the pool); the engine's shard mode (PoolManager), "
    "segments of --chunk tokens",
    "no_host_model": "the preset has no host model: device time + 20 kernel overheads a step",
}


def pool_size(cost: CostModel, total_tokens: int, chunk: int) -> int:
    """Fewest pool GPUs whose KV budget holds `total_tokens` in whole segments."""
    per_gpu = (FAPool().worker_capacity(cost) // chunk) * chunk
    return max(1, math.ceil(total_tokens / per_gpu))


def predict(cost: CostModel, s: FAPool, ctx: int, batch: int) -> dict:
    """One decode step at context `ctx` for `batch` sequences, links per pool GPU."""
    m, tp, P = cost.model, s.base_tp, s.pool_size
    ledger = s.make_ledger(cost, batch, np.zeros(batch, dtype=np.int64))
    assert ledger.try_allocate(np.zeros(batch, np.int64), np.full(batch, ctx + 1)) is None, "KV does not fit"
    kv_w = ledger.owned.sum(axis=0).astype(np.float64)  # tokens per pool GPU
    q_w = (ledger.owned > 0).sum(axis=0).astype(np.float64)  # sequences (queries) per pool GPU
    same = np.arange(tp, tp + P) < cost.hw.gpus_per_node  # pool GPU in the base's node
    attn_w = np.asarray(cost.attention(kv_w, kv_w, q_w), dtype=np.float64)
    # Out: queries + the new token's K/V (one token a sequence, on the GPU holding its open segment).
    new_kv_w = np.bincount(ledger.last, minlength=P).astype(np.float64)
    q_bytes = cost.query_bytes(q_w) + new_kv_w * cost.kv_bytes_per_token_layer()
    r_bytes = cost.partial_bytes(q_w)
    links = [(same, True), (~same, False)]
    send_base = max(float(cost.p2p(q_bytes[sel].sum() / tp, f)) for sel, f in links)
    recv_base = max(float(cost.p2p(r_bytes[sel].sum() / tp, f)) for sel, f in links)
    recv_w = np.where(same, cost.p2p(q_bytes, True), cost.p2p(q_bytes, False))
    send_w = np.where(same, cost.p2p(r_bytes, True), cost.p2p(r_bytes, False))
    pool_path = max(send_base, recv_w.max()) + attn_w.max() + max(recv_base, send_w.max())
    merge = float(cost.elementwise(3 * r_bytes.sum() / tp))
    step, dense_c, dense_ar = s.step_time(cost, batch, batch, 0.0, pool_path, merge, batch * ctx)
    L = m.num_hidden_layers
    kv_bytes = batch * ctx * cost.kv_bytes_per_token()
    roofline = kv_bytes / (P * HBM_PEAK) + cost.weight_bytes("all") / (tp * HBM_PEAK)
    return {
        "tpot_ms": 1e3 * step,
        "roofline_ms": 1e3 * roofline,
        "ratio": step / roofline,
        "pool_kv_max_bytes": float(kv_w.max() * cost.kv_bytes_per_token()),
        "attn_layer_ms": 1e3 * float(attn_w.max()),
        "exchange_layer_ms": 1e3 * (pool_path - float(attn_w.max())),
        "dense_layer_ms": 1e3 * (dense_c + dense_ar),
        "lm_head_ms": 1e3 * float(cost.lm_head(batch, tp)),
        "layers_x_roundtrip_ms": 1e3 * L * (pool_path - float(attn_w.max())),
        "pool_gpus_off_node": int((~same).sum()),
    }


def simulated(cost: CostModel, s: FAPool, ctx: int, batch: int, steps: int) -> float:
    """Mean TPOT (ms) from the discrete-event simulator: `batch` prompts of `ctx` tokens
    already in KV, `steps` decode tokens each."""
    work = PoissonWorkload(
        LengthDist.parse(f"fixed:{ctx}"), LengthDist.parse(f"fixed:{steps}"), math.inf, batch, 0
    )
    res = simulate(s, cost, work, SimConfig(prefill="skip", progress=False))
    return 1e3 * float(res.tpot.mean())


def with_ib_latency(hw: HardwareProfile, latency: float) -> HardwareProfile:
    ib = hw.inter_node
    return hw.replace(inter_node=LinkProfile(ib.bandwidth, latency, ib.hop_latency))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(CONFIG))
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144, 1048576])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--base-tps", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--chunk", type=int, default=16384, help="tokens a pool segment (shard mode)")
    ap.add_argument("--sim-steps", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    hw = get_hardware("h200")
    cost = CostModel(load_model_config(args.model), hw)
    m = cost.model
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            for tp in args.base_tps:
                P = pool_size(cost, batch * (ctx + args.sim_steps), args.chunk)
                s = FAPool(
                    base_tp=tp,
                    pool_size=P,
                    threshold=0,
                    tokens_per_worker=args.chunk,
                    mode="shard",
                    overlap=batch > 1,
                    max_batch=batch,
                )
                s.validate(cost)
                row = {
                    "context": ctx,
                    "batch": batch,
                    "base_tp": tp,
                    "pool_gpus": P,
                    "gpus": tp + P,
                    "nodes": math.ceil((tp + P) / hw.gpus_per_node),
                    "kv_per_seq_bytes": ctx * cost.kv_bytes_per_token(),
                    "weights_per_base_gpu_bytes": cost.weight_bytes("all") / tp,
                    **predict(cost, s, ctx, batch),
                    "sim_tpot_ms": simulated(cost, s, ctx, batch, args.sim_steps),
                }
                row["pool_headroom_bytes"] = hw.memory_bytes - row["pool_kv_max_bytes"]
                if ctx == max(args.contexts):
                    for lat in (33.0e-6, 66.6e-6):
                        alt = CostModel(m, with_ib_latency(hw, lat))
                        row[f"tpot_ms_ib_{lat * 1e6:.1f}us"] = predict(alt, s, ctx, batch)["tpot_ms"]
                    wide = dataclasses.replace(s, pool_size=2 * P)
                    row["tpot_ms_2x_pool"] = predict(cost, wide, ctx, batch)["tpot_ms"]
                rows.append(row)

    t = Table(title=f"SIMULATED: FA Pool on H200s (h200 preset), {Path(args.model).stem}, threshold 0")
    for col in (
        "ctx",
        "B",
        "base",
        "pool",
        "nodes",
        "KV/seq GiB",
        "weights/base GB",
        "KV/pool GPU GB",
        "attn/layer ms",
        "xchg/layer ms",
        "dense/layer ms",
        "TPOT ms",
        "sim TPOT ms",
        "roofline ms",
        "x roofline",
        "TPOT @IB 33/66.6us",
        "TPOT 2x pool",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        lat = (
            f"{r['tpot_ms_ib_33.0us']:.1f} / {r['tpot_ms_ib_66.6us']:.1f}" if "tpot_ms_ib_33.0us" in r else ""
        )
        t.add_row(
            f"{r['context'] // 1024}K",
            str(r["batch"]),
            f"TP{r['base_tp']}",
            str(r["pool_gpus"]),
            str(r["nodes"]),
            f"{r['kv_per_seq_bytes'] / 2**30:.0f}",
            f"{r['weights_per_base_gpu_bytes'] / 1e9:.1f}",
            f"{r['pool_kv_max_bytes'] / 1e9:.1f}",
            f"{r['attn_layer_ms']:.3f}",
            f"{r['exchange_layer_ms']:.3f}",
            f"{r['dense_layer_ms']:.3f}",
            f"{r['tpot_ms']:.2f}",
            f"{r['sim_tpot_ms']:.2f}",
            f"{r['roofline_ms']:.2f}",
            f"{r['ratio']:.2f}",
            lat,
            f"{r['tpot_ms_2x_pool']:.2f}" if "tpot_ms_2x_pool" in r else "",
        )
    console = Console(width=240)
    console.print(t)
    links = {"intra_node": asdict(hw.intra_node), "inter_node": asdict(hw.inter_node)}
    console.print(f"links (preset h200, effective): {links}; assumptions: {ASSUMPTIONS}")
    if args.no_write:
        return
    env = environment("cpu")
    env["device"] = f"SIMULATED h200 preset (computed on {env['device']})"
    model = {
        k: getattr(m, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        )
    }
    model.update(
        kv_bytes_per_token=cost.kv_bytes_per_token(),
        weight_bytes=cost.weight_bytes("all"),
        dtype="bf16",
        config=os.path.relpath(args.model, repo_root()),
    )
    hw_fields = {
        k: v for k, v in asdict(hw).items() if k not in ("host", "pool", "gemm_by_m", "attn_by_bytes")
    }
    payload = {
        "env": env,
        "label": "SIMULATED",
        "model": model,
        "hardware": hw_fields,
        "assumptions": ASSUMPTIONS,
        "chunk_tokens": args.chunk,
        "sim_steps": args.sim_steps,
        "rows": rows,
    }
    top = [r for r in rows if r["context"] == max(args.contexts)]
    summary = (
        "SIMULATED (h200 preset), Llama-3-8B shape, 1M-token context, FA Pool threshold 0: "
        + "; ".join(
            f"B{r['batch']} TP{r['base_tp']}+{r['pool_gpus']} pool: TPOT {r['tpot_ms']:.1f} ms "
            f"(x{r['ratio']:.2f} HBM roofline)"
            for r in top
            if r["base_tp"] == min(args.base_tps)
        )
    )
    console.print(f"wrote {write_result('plan_1m_context', payload, summary)}")


if __name__ == "__main__":
    main()
