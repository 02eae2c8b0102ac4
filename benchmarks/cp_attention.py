"""Per-rank time and peak memory of context-parallel attention on 2 CPU gloo ranks; prints JSON.

Compared at several full sequence lengths S (B=1, fp32, one thread per rank):

- `full`: every rank runs plain SDPA on the whole sequence (what cp=1 costs per process): the baseline.
- `ring`: RingAttention on S/2 tokens per rank (block kernel: torch's CPU flash op, which returns the LSE).
- `a2a`: UlyssesAttention on S/2 tokens per rank (SDPA inside on S tokens x H/2 heads).
- `torch_cp`: torch.distributed.tensor.experimental.context_parallel around SDPA. On CPU it
  all-gathers K/V (no ring) and has no sharding rule for the CPU flash backward op, so only its
  forward is measured; the backward error is reported in the JSON.

Phases: "fwd" (forward only, with autograd recording as in training, so activations are kept) and
"fwd+bwd". Memory: peak resident set size above the level before the call, per rank, read from
/proc/self/status VmHWM after resetting it (`echo 5 > /proc/self/clear_refs`); glibc is told to mmap
every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS immediately.
Inputs exist before the measurement and are not counted in peak_mib; outputs, saved activations,
communication buffers and gradients are. `inputs_mib` is the size of the q/k/v a rank holds (in a
model these are activations of the projections) and `with_inputs_vs_full` compares peak + inputs.

Usage: python benchmarks/cp_attention.py [--seq 1024,2048,4096] [--heads 4] [--head-dim 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn, barrier) -> tuple[float, float]:
    """(seconds, peak RSS growth in MiB) of one call of fn on this rank."""
    gc.collect()
    barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return seconds, (peak - base) / 1024


def _rank_main(rank: int, world: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    from cosmos_train.runtime.attention import SDPAAttention
    from cosmos_train.runtime.context_parallel import UlyssesAttention
    from cosmos_train.runtime.ring_attention import RingAttention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        group = dist.group.WORLD
        barrier = dist.barrier
        modules = {"full": SDPAAttention(), "ring": RingAttention(group, kernel="flash"),
                   "a2a": UlyssesAttention(group)}
        rows, torch_cp_backward_error = [], None
        for seq in args.seq:
            g = torch.Generator().manual_seed(seq)
            q, k, v = (torch.randn(1, seq, args.heads, args.head_dim, generator=g) for _ in range(3))
            local_len = seq // world
            sl = slice(rank * local_len, (rank + 1) * local_len)
            for method, module in modules.items():
                src = (q, k, v) if method == "full" else tuple(t[:, sl].contiguous() for t in (q, k, v))
                for phase in ("fwd", "fwd+bwd"):
                    def call(module=module, src=src, phase=phase):
                        leaves = [t.requires_grad_() for t in (x.detach() for x in src)]
                        out = module(*leaves)
                        if phase == "fwd+bwd":
                            out.sum().backward()
                    row = _run(method, phase, seq, call, barrier, args.repeats)
                    row["inputs_mib"] = sum(t.numel() * t.element_size() for t in src) / 2**20
                    rows.append(row)

            # torch's experimental CP shards (B, H, S, D) buffers in place on entering the context.
            def torch_cp(q=q, k=k, v=v):
                bufs = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(bufs)):
                    for t in bufs:
                        t.requires_grad_()
                    out = F.scaled_dot_product_attention(*bufs)
                    return out

            row = _run("torch_cp", "fwd", seq, torch_cp, barrier, args.repeats)
            row["inputs_mib"] = 3 * q.numel() * q.element_size() / 2**20  # it starts from the full buffers
            rows.append(row)
            if torch_cp_backward_error is None:
                try:
                    torch_cp().sum().backward()
                    torch_cp_backward_error = ""
                except Exception as exc:  # record why torch CP cannot run backward on CPU
                    torch_cp_backward_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        queue.put((rank, rows, torch_cp_backward_error))
    finally:
        dist.destroy_process_group()


def _run(method, phase, seq, call, barrier, repeats) -> dict:
    call()  # warm-up (allocator, gloo buffers, kernel dispatch)
    times, peaks = zip(*(_measure(call, barrier) for _ in range(repeats)))
    return {"method": method, "phase": phase, "seq": seq, "time_s": statistics.median(times),
            "peak_mib": max(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    world = 2
    # Read by glibc at process start: the spawned ranks inherit it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict((rank, (rows, err)) for rank, rows, err in (queue.get(timeout=3600) for _ in procs))
    for p in procs:
        p.join()

    table = []
    for i, row in enumerate(results[0][0]):
        per_rank = [results[r][0][i] for r in range(world)]
        table.append({k: row[k] for k in ("method", "phase", "seq")} | {
            "time_s": [round(x["time_s"], 4) for x in per_rank],
            "peak_mib": [round(x["peak_mib"], 1) for x in per_rank], "inputs_mib": round(row["inputs_mib"], 1)})
    base = {(r["phase"], r["seq"]): r for r in table if r["method"] == "full"}
    for r in table:
        b = base[(r["phase"], r["seq"])]
        r["time_vs_full"] = round(max(r["time_s"]) / max(b["time_s"]), 3)
        r["peak_mib_vs_full"] = round(max(r["peak_mib"]) / max(max(b["peak_mib"]), 1e-9), 3)
        r["with_inputs_vs_full"] = round((max(r["peak_mib"]) + r["inputs_mib"])
                                         / (max(b["peak_mib"]) + b["inputs_mib"]), 3)
    print(json.dumps({
        "benchmark": "cp_attention", "ranks": world, "backend": "gloo (CPU)", "threads_per_rank": 1,
        "shape": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32"},
        "baseline": "full: plain SDPA on the whole sequence on every rank (cp=1 per process)",
        "memory": "peak RSS growth per rank (VmHWM after clear_refs reset), MALLOC_MMAP_THRESHOLD_=64KiB",
        "ratios": "max over ranks / same of the baseline at the same seq and phase",
        "torch_cp_backward_error": results[0][1], "results": table}, indent=1))


if __name__ == "__main__":
    main()
