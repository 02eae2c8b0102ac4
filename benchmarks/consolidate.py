"""Benchmark: streaming consolidation vs torch's `dcp_to_torch_save`, wall time and peak RSS.

For each checkpoint size (default 1 GB and 4 GB of fp32 tensors shaped like the
2B DiT's: 24 tensors per block at model_channels 2048, plus the embedders, final
layer and buffers), a DCP model part is saved by 2 gloo ranks (dim-0 sharded
DTensors, as FSDP2 writes them). Then each converter runs in a fresh process:

  torch/.pt           torch.distributed.checkpoint.format_utils.dcp_to_torch_save
  torch/.safetensors  the same full load (_EmptyStateDictLoadPlanner), then safetensors.torch.save_file
  ours/.pt            cosmos_train.export.consolidate.consolidate(..., "model.pt")
  ours/.safetensors   cosmos_train.export.consolidate.consolidate(..., "model.safetensors")

Reported per run: `seconds` (the conversion, timed inside the process),
`process_seconds` (the whole fresh process, start-up included) and `peak_rss_gib`
(ru_maxrss of that process); `baseline_rss_gib` is a process that only imports
the same modules. Ratios are ours / torch. The page cache is warm for every run
(the checkpoint was just written) and dirty pages are synced between runs.

    .venv/bin/python benchmarks/consolidate.py [--sizes-gb 1,4] [--repeats 1] [--workdir DIR]

Prints one JSON document. Deletes everything it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D = 2048  # 2B DiT model_channels


def dit_like_shapes(n_blocks: int) -> list[tuple[str, tuple[int, ...], str]]:
    """`(key, shape, dtype name)` of a 2B-DiT-shaped state dict with `n_blocks` blocks (net. prefix)."""
    out = [("x_embedder.proj.1.weight", (D, 72), "float32"),
           ("t_embedder.1.linear_1.weight", (D, D), "float32"),
           ("t_embedder.1.linear_2.weight", (3 * D, D), "float32"),
           ("t_embedding_norm.weight", (D,), "float32"),
           ("pos_embedder.seq", (128,), "float32"),
           ("pos_embedder.dim_spatial_range", (21,), "float32"),
           ("pos_embedder.dim_temporal_range", (22,), "float32"),
           ("accum_iteration", (), "int64"),
           ("accum_train_in_hours", (), "float32")]
    for b in range(n_blocks):
        p = f"blocks.{b}."
        for attn, kv_in in (("self_attn", D), ("cross_attn", 1024)):
            out += [(f"{p}{attn}.q_proj.weight", (D, D), "float32"),
                    (f"{p}{attn}.k_proj.weight", (D, kv_in), "float32"),
                    (f"{p}{attn}.v_proj.weight", (D, kv_in), "float32"),
                    (f"{p}{attn}.output_proj.weight", (D, D), "float32"),
                    (f"{p}{attn}.q_norm.weight", (128,), "float32"),
                    (f"{p}{attn}.k_norm.weight", (128,), "float32")]
        out += [(f"{p}mlp.layer1.weight", (4 * D, D), "float32"), (f"{p}mlp.layer2.weight", (D, 4 * D), "float32")]
        for m in ("self_attn", "cross_attn", "mlp"):
            out += [(f"{p}adaln_modulation_{m}.1.weight", (256, D), "float32"),
                    (f"{p}adaln_modulation_{m}.2.weight", (3 * D, 256), "float32")]
    out += [("final_layer.adaln_modulation.1.weight", (256, D), "float32"),
            ("final_layer.adaln_modulation.2.weight", (2 * D, 256), "float32"),
            ("final_layer.linear.weight", (64, D), "float32")]
    return [("net." + k, s, dt) for k, s, dt in out]


def _nbytes(shapes) -> int:
    total = 0
    for _, s, dt in shapes:
        n = 8 if dt == "int64" else 4
        for d in s:
            n *= d
        total += n
    return total


def blocks_for(size_gb: float) -> int:
    """Number of blocks whose checkpoint is closest to `size_gb` (10^9 bytes)."""
    return min(range(1, 64), key=lambda n: abs(_nbytes(dit_like_shapes(n)) - size_gb * 1e9))


# ------------------------------------------------------------------------- checkpoint writer
def _save_rank(rank: int, world_size: int, port: int, path: str, n_blocks: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        g = torch.Generator().manual_seed(rank)
        sd = {}
        for key, shape, dt in dit_like_shapes(n_blocks):
            if shape and shape[0] % world_size == 0:  # FSDP2-style dim-0 shards
                local = torch.rand((shape[0] // world_size, *shape[1:]), generator=g, dtype=getattr(torch, dt)) \
                    if dt != "int64" else torch.zeros((shape[0] // world_size, *shape[1:]), dtype=torch.int64)
                sd[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            else:
                full = torch.full(shape, 3, dtype=getattr(torch, dt))
                sd[key] = DTensor.from_local(full, mesh, [Replicate()], run_check=False)
        dcp.save(sd, checkpoint_id=path)
    finally:
        dist.destroy_process_group()


def save_checkpoint(path: Path, n_blocks: int) -> None:
    """Write a 2-rank DCP checkpoint of the DiT-like state dict to `path`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_save_rank, args=(2, port, str(path), n_blocks), nprocs=2, start_method="spawn", join=True)


# ------------------------------------------------------------------------------- one run
def worker(tool: str, src: str, out: str) -> None:
    """Runs in a fresh process: convert and print `{"seconds", "peak_rss_bytes"}` as JSON."""
    import warnings

    import torch  # noqa: F401 - imported by both tools; part of the baseline
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from cosmos_train.export.consolidate import consolidate

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    if tool == "torch" and out.endswith(".pt"):
        dcp_to_torch_save(src, out)
    elif tool == "torch":
        from safetensors.torch import save_file

        sd: dict = {}
        _load_state_dict(sd, storage_reader=FileSystemReader(src), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        save_file(sd, out)
    elif tool == "ours":
        consolidate(src, out, progress=False)
    elif tool != "baseline":
        raise ValueError(tool)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": rss}))


def run_fresh(tool: str, src: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--worker", tool, str(src), str(out)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    process_seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{tool} -> {out.name} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    size = out.stat().st_size if out.exists() else 0
    if out.exists():
        out.unlink()
    os.sync()  # flush this run's dirty pages so they do not slow the next one
    return {"seconds": round(r["seconds"], 2), "process_seconds": round(process_seconds, 2),
            "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 3), "output_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", default="1,4", help="checkpoint sizes in GB (10^9 bytes), comma separated")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (tool, format); the fastest is kept")
    ap.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    work = Path(tempfile.mkdtemp(prefix="consolidate-bench-", dir=args.workdir))
    need = max(sizes) * 1e9 * 2.2  # checkpoint + one output at a time, with margin
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work)
        sys.exit(f"not enough free disk in {work.parent}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    results = []
    try:
        baseline = run_fresh("baseline", work, work / "none")
        for size in sizes:
            n_blocks = blocks_for(size)
            shapes = dit_like_shapes(n_blocks)
            ckpt = work / f"ckpt_{size:g}gb"
            t0 = time.perf_counter()
            save_checkpoint(ckpt, n_blocks)
            os.sync()
            save_s = time.perf_counter() - t0
            model_bytes = _nbytes(shapes)
            largest = max(_nbytes([s]) for s in shapes)
            for fmt in ("pt", "safetensors"):
                runs = {}
                for tool in ("torch", "ours"):
                    tries = [run_fresh(tool, ckpt, work / f"out_{tool}.{fmt}") for _ in range(args.repeats)]
                    runs[tool] = min(tries, key=lambda r: r["seconds"])
                t, o = runs["torch"], runs["ours"]
                results.append({
                    "size_gb": round(model_bytes / 1e9, 3), "tensors": len(shapes), "blocks": n_blocks,
                    "largest_tensor_mib": round(largest / 2**20, 1), "format": fmt, "checkpoint_save_s": round(save_s, 1),
                    "torch": t, "ours": o,
                    "time_ratio": round(o["seconds"] / t["seconds"], 3),
                    "process_time_ratio": round(o["process_seconds"] / t["process_seconds"], 3),
                    "rss_ratio": round(o["peak_rss_gib"] / t["peak_rss_gib"], 3),
                    "ours_rss_above_baseline_over_model": round(
                        (o["peak_rss_gib"] - baseline["peak_rss_gib"]) * 2**30 / model_bytes, 3),
                })
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "consolidate",
        "baseline_name": "torch dcp_to_torch_save (.pt) / full DCP load + safetensors.save_file (.safetensors)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": __import__("torch").__version__,
        "baseline_rss_gib": baseline["peak_rss_gib"],
        "repeats": args.repeats,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
