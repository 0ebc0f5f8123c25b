"""Round-trip latency of one message between two ranks of this host, and the time of a sum over
2 and 3 ranks, through the engine's same-host transport (Unix-domain sockets) and through
gloo's TCP pairs (what every exchange used before, and still uses across hosts), in one run.
Each rank computes on one thread, as the engine's ranks do.

    PYTHONPATH=. python benchmarks/p2p_latency.py [--iters 500] [--no-save]

Sizes: one decode step's hidden states of SmolLM2 at batch 8 (8 x 576 float32, 18 KB), a
prefill chunk's (512 x 576, 1.2 MB) and a small control message (64 bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fapool.bench.results import environment, write_result
from fapool.worker import comm

SIZES = {"64 B": (16,), "18 KB": (8, 576), "1.2 MB": (512, 576)}


def _rank(rank: int, world: int, port: int, transport: str, iters: int, queue) -> None:
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{port}"
    if transport == "local":
        comm.init_process_group(rank, world, init, "gloo", 600)
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    waiter = comm.Waiter()

    def wait(work, peer: int) -> None:
        waiter.wait(work, 60.0, peer, "bench")

    group = dist.new_group(list(range(world)))
    rows = {}
    for label, shape in SIZES.items():
        x, buf = torch.randn(shape), torch.empty(shape)
        times = []
        for i in range(iters + 20):
            t0 = time.perf_counter()
            if rank == 0:
                wait(comm.send_tensor(x, 1), 1)
                wait(comm.recv_tensor(buf, 1), 1)
            elif rank == 1:
                wait(comm.recv_tensor(buf, 0), 0)
                wait(comm.send_tensor(buf, 0), 0)
            if i >= 20:
                times.append(time.perf_counter() - t0)
        rows[f"round trip {label}"] = times
        times = []
        for i in range(iters + 20):
            t0 = time.perf_counter()
            wait(comm.all_reduce(x.clone(), group), (rank + 1) % world)
            if i >= 20:
                times.append(time.perf_counter() - t0)
        rows[f"sum over {world} ranks {label}"] = times
    if rank == 0:
        queue.put({k: statistics.median(v) for k, v in rows.items()})
    comm.destroy_process_group() if transport == "local" else dist.destroy_process_group()


def measure(transport: str, world: int, iters: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = comm.free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, transport, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    results: dict[str, dict[str, float]] = {}
    for world in (2, 3):
        for transport in ("local", "gloo"):
            for k, v in measure(transport, world, args.iters).items():
                if world == 3 and k.startswith("round trip"):
                    continue  # the third rank idles: the 2-rank figure is the clean one
                results.setdefault(k, {})[transport] = v
    print(f"{'median (us)':32s} {'local':>10s} {'gloo':>10s} {'gloo / local':>13s}")
    for k, v in results.items():
        print(f"{k:32s} {v['local'] * 1e6:10.0f} {v['gloo'] * 1e6:10.0f} {v['gloo'] / v['local']:13.1f}")
    if not args.no_save:
        try:
            load = open("/proc/loadavg").read().split()[0]
        except OSError:
            load = "?"
        payload = {"env": environment("cpu"), "iters": args.iters, "load_avg": load, "median_s": results}
        summary = "same-host transport vs gloo TCP, 1 thread per rank (median, load avg " + load + "): " + "; ".join(
            f"{k} {v['local'] * 1e6:.0f} vs {v['gloo'] * 1e6:.0f} us (x{v['gloo'] / v['local']:.1f})"
            for k, v in results.items()
        )
        print(write_result("p2p_latency", payload, summary))


if __name__ == "__main__":
    main()
