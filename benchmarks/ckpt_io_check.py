"""Checkpoint I/O on the device the ranks train on: async_pinned saves, resume, load_path. Prints JSON.

    python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/ckpt_io_check.py WORKDIR [--gb 1]

On CUDA (NCCL) this is the `ckpt_io` check of `gpu_check.sh`: an FSDP2 model of fp32
[2048, 2048] layers on every GPU is saved twice with `async_mode = "async_pinned"`
(pinned staging buffers reused by the second save), resumed into a fresh model (chunks
read through CPU into the GPU shards, CRC-checked against the manifest), consolidated
to `.safetensors` by rank 0 and loaded again through `load_path` (every rank reads its
own shards). Both loads must be bitwise equal to the saved weights. Without CUDA it
runs the same on gloo/CPU (how it is tested here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosmos_train.checkpoint.manager import Checkpointer  # noqa: E402
from cosmos_train.spec import CheckpointSpec  # noqa: E402

WIDTH = 2048


def _model(n: int, device: torch.device, seed: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Module()
    with torch.device("meta"):
        model.blocks = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(n))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed * 100 + dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().uniform_(-1, 1, generator=g)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x.to_local(), y.to_local()) for x, y in zip(a.parameters(), b.parameters()))


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(args.workdir)
    n = max(1, int(args.gb * 1e9 / (WIDTH * WIDTH * 4)))
    model = _model(n, device, seed=1)
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "world": dist.get_world_size(),
           "model_gb": round(n * WIDTH * WIDTH * 4 / 1e9, 3)}

    ck = Checkpointer(CheckpointSpec(save_iter=1, async_mode="async_pinned", keep_last=2), root / "run", model=model)
    for step in (1, 2):  # the second save reuses the pinned staging buffers
        ck.save(step)
        ck.wait()
    out["async_pinned_blocking_s"] = [round(s.blocking_s, 4) for s in ck.stats]
    out["async_pinned_total_write_s"] = [round(s.write_s, 4) for s in ck.stats]
    ck.close()

    fresh = _model(n, device, seed=2)
    ck = Checkpointer(CheckpointSpec(), root / "run", model=fresh)
    t0 = _synced(device)
    assert ck.load() == 2
    out["resume_s"] = round(_synced(device) - t0, 4)
    ck.close()
    out["resume_equal"] = _same(model, fresh)

    weights = root / "model.safetensors"
    if rank == 0:
        from cosmos_train.export.consolidate import consolidate

        rep = consolidate(root / "run" / "checkpoints" / "iter_000000002", weights, progress=False)
        out["consolidate_s"] = round(rep.seconds, 4)
    dist.barrier()
    again = _model(n, device, seed=3)
    ck = Checkpointer(CheckpointSpec(), root / "init", model=again)
    t0 = _synced(device)
    assert ck.initialize(load_path=str(weights))
    out["load_path_s"] = round(_synced(device) - t0, 4)
    ck.close()
    out["load_path_equal"] = _same(model, again)
    oks = [None] * dist.get_world_size()
    dist.all_gather_object(oks, out["resume_equal"] and out["load_path_equal"])
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()
    assert all(oks), out


if __name__ == "__main__":
    main()
