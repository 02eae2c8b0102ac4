"""Per-rank time, peak memory and saved activations of context-parallel attention on CPU gloo ranks; prints JSON.

Compared at several full sequence lengths S (B=1, fp32, one thread per rank):

- `full`: every rank runs plain SDPA on the whole sequence (what cp=1 costs per process): the baseline.
- `ring`: RingAttention on S/cp tokens per rank (block kernel: torch's CPU flash op, which returns the LSE).
- `a2a`: UlyssesAttention on S/cp tokens per rank (SDPA inside on S tokens x H/cp heads).
- `torch_cp`: torch.distributed.tensor.experimental.context_parallel around SDPA. On CPU it
  all-gathers K/V (no ring) and has no sharding rule for the CPU flash backward op, so only its
  forward is measured; the backward error is reported in the JSON.

Two kinds of memory figure, per rank:

1. Saved activations (`saved`, deterministic): the bytes autograd keeps from the forward until the
   backward, which is what a deep model multiplies by its layer count. One forward runs inside
   `torch.autograd.graph.saved_tensors_hooks`; the pack hook records the storage (data_ptr, nbytes)
   of every saved tensor, deduplicated by storage, and returns the tensor unchanged. Whole storages
   are counted (a view that keeps a larger buffer alive counts the buffer). `saved_inputs_mib` is the
   part of it that is the call's own q/k/v (in a model they are kept only because attention saves
   them). Measured at every cp in --saved-cp (default 2 and 4). torch_cp here runs SDPA on fresh
   copies of the sharded buffers (as a model's projections would produce), because the buffers
   it shards in place keep their full-size storage.
2. Timing and transient peak (`fwd`, `fwd+bwd`, cp=2 only): peak resident set size above the level
   before the call, read from /proc/self/status VmHWM after resetting it (`echo 5 > clear_refs`);
   glibc is told to mmap every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave
   the RSS immediately. Inputs exist before the measurement and are not counted in peak_mib;
   outputs, saved activations, communication buffers and gradients are. `inputs_mib` is the size
   of the q/k/v a rank holds and `with_inputs_vs_full` compares peak + inputs.

Usage: python benchmarks/cp_attention.py [--seq 1024,2048,4096] [--heads 4] [--head-dim 64] [--repeats 3]
       [--saved-cp 2,4]
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

TIMED_CP = 2  # timing and peak RSS: 2 ranks (one per core of a small box)


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


def _saved_mib(forward) -> tuple[float, float]:
    """(MiB autograd saves for backward in one call of forward, MiB of it that are the inputs' storages).

    forward() -> (out, input leaves). Saved tensors stay alive while `out` (and its graph) does, so
    their storages cannot be freed and reused during the call: deduplicating by data_ptr is exact.
    """
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    storages: dict[int, int] = {}

    def record(t):
        if is_traceable_wrapper_subclass(t):  # e.g. a DTensor: count the plain tensors it wraps
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):  # DTensor also lists its device mesh
                    record(inner)
            return
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    def pack(t):
        record(t)
        return t

    gc.collect()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, leaves = forward()
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    total = sum(storages.values())
    from_inputs = sum(n for ptr, n in storages.items() if ptr in inputs)
    del out, leaves
    return total / 2**20, from_inputs / 2**20


def _rank_main(rank: int, world: int, port: int, args, timed: bool, queue) -> None:
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
        rows, saved_rows, torch_cp_backward_error = [], [], None
        for seq in args.seq:
            g = torch.Generator().manual_seed(seq)
            q, k, v = (torch.randn(1, seq, args.heads, args.head_dim, generator=g) for _ in range(3))
            local_len = seq // world
            sl = slice(rank * local_len, (rank + 1) * local_len)
            for method, module in modules.items():
                # clone: a B=1 slice is already contiguous and would keep the full storage alive.
                src = (q, k, v) if method == "full" else tuple(t[:, sl].clone() for t in (q, k, v))

                def forward(module=module, src=src):
                    leaves = [t.detach().requires_grad_() for t in src]
                    return module(*leaves), leaves

                barrier()
                saved, saved_inputs = _saved_mib(forward)
                saved_rows.append({"method": method, "seq": seq, "saved_mib": saved,
                                   "saved_inputs_mib": saved_inputs})
                if not timed:
                    continue
                for phase in ("fwd", "fwd+bwd"):
                    def call(forward=forward, phase=phase):
                        out, _ = forward()
                        if phase == "fwd+bwd":
                            out.sum().backward()
                    row = _run(method, phase, seq, call, barrier, args.repeats)
                    row["inputs_mib"] = sum(t.numel() * t.element_size() for t in src) / 2**20
                    rows.append(row)

            # torch's experimental CP shards (B, H, S, D) buffers in place on entering the context.
            def torch_cp(q=q, k=k, v=v, fresh=False):
                bufs = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(bufs)):
                    # resize_ keeps the full-size storage: fresh copies hold only the local shard.
                    leaves = [t.clone() for t in bufs] if fresh else bufs
                    for t in leaves:
                        t.requires_grad_()
                    return F.scaled_dot_product_attention(*leaves), leaves

            barrier()
            try:
                saved, saved_inputs = _saved_mib(lambda: torch_cp(fresh=True))
                saved_rows.append({"method": "torch_cp", "seq": seq, "saved_mib": saved,
                                   "saved_inputs_mib": saved_inputs})
            except Exception as exc:  # torch's prototype may not run at every cp: say why, go on
                saved_rows.append({"method": "torch_cp", "seq": seq, "saved_mib": None,
                                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            if not timed:
                continue
            row = _run("torch_cp", "fwd", seq, lambda: torch_cp()[0], barrier, args.repeats)
            row["inputs_mib"] = 3 * q.numel() * q.element_size() / 2**20  # it starts from the full buffers
            rows.append(row)
            if torch_cp_backward_error is None:
                try:
                    torch_cp()[0].sum().backward()
                    torch_cp_backward_error = ""
                except Exception as exc:  # record why torch CP cannot run backward on CPU
                    torch_cp_backward_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        queue.put((rank, rows, saved_rows, torch_cp_backward_error))
    finally:
        dist.destroy_process_group()


def _run(method, phase, seq, call, barrier, repeats) -> dict:
    call()  # warm-up (allocator, gloo buffers, kernel dispatch)
    times, peaks = zip(*(_measure(call, barrier) for _ in range(repeats)))
    return {"method": method, "phase": phase, "seq": seq, "time_s": statistics.median(times),
            "peak_mib": max(peaks)}


def _spawn(world: int, args, *, timed: bool) -> dict:
    """Run _rank_main on `world` fresh gloo processes; {rank: (rows, saved_rows, torch_cp_backward_error)}."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, timed, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=3600) for _ in procs)}
    for p in procs:
        p.join()
    return results


def _timing_table(results: dict, world: int) -> list[dict]:
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
    return table


def _saved_table(results: dict, world: int) -> list[dict]:
    table = []
    for i, row in enumerate(results[0][1]):
        per_rank = [results[r][1][i] for r in range(world)]
        entry = {"cp": world, "method": row["method"], "seq": row["seq"]}
        if any(x["saved_mib"] is None for x in per_rank):
            entry["error"] = next(x["error"] for x in per_rank if x["saved_mib"] is None)
        else:
            entry |= {"saved_mib": [round(x["saved_mib"], 3) for x in per_rank],
                      "saved_inputs_mib": [round(x["saved_inputs_mib"], 3) for x in per_rank]}
        table.append(entry)
    base = {r["seq"]: max(r["saved_mib"]) for r in table if r["method"] == "full"}
    for r in table:
        if "saved_mib" in r:
            r["saved_vs_full"] = round(max(r["saved_mib"]) / base[r["seq"]], 4)
            r["ideal_vs_full"] = round(1 / world, 4) if r["method"] != "full" else 1.0
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--seq", type=ints, default=[1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saved-cp", type=ints, default=[2, 4],
                        help="cp degrees for the saved-activation count (cp=2 also gets timing)")
    args = parser.parse_args()
    for cp in {TIMED_CP, *args.saved_cp}:
        bad = [s for s in args.seq if s % (2 * cp)]  # torch_cp's head-tail layout needs 2*cp chunks
        if bad or args.heads % cp:
            parser.error(f"cp={cp} needs every --seq divisible by {2 * cp} (bad: {bad}) and "
                         f"--heads ({args.heads}) divisible by {cp}")
    # Read by glibc at process start: the spawned ranks inherit it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)

    wall0 = time.perf_counter()
    timed = _spawn(TIMED_CP, args, timed=True)
    saved = _saved_table(timed, TIMED_CP) if TIMED_CP in args.saved_cp else []
    for cp in sorted(set(args.saved_cp) - {TIMED_CP}):
        saved += _saved_table(_spawn(cp, args, timed=False), cp)
    print(json.dumps({
        "benchmark": "cp_attention", "timed_ranks": TIMED_CP, "saved_cp": args.saved_cp,
        "backend": "gloo (CPU)", "threads_per_rank": 1,
        "shape": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32"},
        "baseline": "full: plain SDPA on the whole sequence on every rank (cp=1 per process)",
        "memory": "peak RSS growth per rank (VmHWM after clear_refs reset), MALLOC_MMAP_THRESHOLD_=64KiB",
        "saved": "bytes of the storages autograd saves for backward in one forward (saved_tensors_hooks), "
                 "per rank; saved_inputs_mib: the part that is the call's own q/k/v",
        "ratios": "max over ranks / same of the baseline at the same seq (and phase, cp)",
        "torch_cp_backward_error": timed[0][2], "results": _timing_table(timed, TIMED_CP),
        "saved_activations": saved, "wall_s": round(time.perf_counter() - wall0, 1)}, indent=1))


if __name__ == "__main__":
    main()
