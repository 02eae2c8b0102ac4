"""Checkpoint save/load throughput on an FSDP2 model (>= 1 GB, many tensors) on 2 gloo ranks (CPU).

    python benchmarks/checkpoint_save.py [--gb 1.0] [--dir /tmp/ckbench] [--ranks 2] [--repeats 3] [--loads-only]

Baselines: the same bytes written from Python with fsync (each rank writes its shard
to one file), i.e. the disk limit; and torch's own `dcp.async_save` (thread writer,
default stager) of the model state dict, whose blocking time the async modes are held
to. Measured with the project's Checkpointer:
sync save (async_mode=off), async blocking and total, async_pinned blocking and
total (its second save reuses the staging buffers), and resume (load). The cost of
verifying CRCs while loading is measured against torch's own FileSystemReader on the
same model part, page cache warm (`load_verify_overhead`). Prints JSON.

Load against raw read (`--repeats` interleaved rounds, medians): before each cold
measurement the files' pages are evicted from the page cache with
posix_fadvise(DONTNEED) (no root needed; works for clean pages, and every file here
was fsynced). `resume_cold`: the ranks reading the DCP files of the checkpoint
round-robin, 16 MiB at a time, against resume of the same checkpoint
(`Checkpointer.load`). `load_path_<fmt>_cold`: rank 0 consolidates the checkpoint to
`.pt` and `.safetensors`; raw read = rank 0 reading that file, split read = every rank
reading its 1/world of it at once, against `Checkpointer.initialize(load_path=...)`
(every rank reads its own shards from the file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosmos_train.checkpoint.manager import Checkpointer  # noqa: E402
from cosmos_train.spec import CheckpointSpec  # noqa: E402
from tests.dist import run_ranks  # noqa: E402

WIDTH = 1024


def _model(gb: float):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n = max(1, int(gb * 1e9 / (WIDTH * WIDTH * 4)))  # fp32 [1024, 1024] tensors of 4 MiB
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList()
    with torch.device("meta"):
        for _ in range(n):
            model.blocks.append(torch.nn.Linear(WIDTH, WIDTH, bias=False))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for i in range(0, n, 16):  # groups of 16 layers per FSDP unit, like transformer blocks
        fully_shard(list(model.blocks[i:i + 16]), mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().uniform_(-1, 1, generator=g)
    return model, n


def _max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _evict(files) -> None:
    """Drop the files' pages from the page cache (clean pages only: they were fsynced)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read(f, start: int = 0, end: int | None = None) -> int:
    """Read a file (or bytes [start, end) of it) 16 MiB at a time into one reused buffer; bytes read."""
    buf = memoryview(bytearray(16 << 20))
    n = 0
    left = float("inf") if end is None else end - start
    with open(f, "rb", buffering=0) as fh:
        fh.seek(start)
        while left > 0 and (k := fh.readinto(buf[:int(min(len(buf), left))])):
            n += k
            left -= k
    return n


def _bench(rank, world, root, gb, repeats, loads_only=False):
    root = Path(root)
    model, n = _model(gb)
    local = [p.detach().to_local() for p in model.parameters()]
    nbytes_local = sum(t.numel() * t.element_size() for t in local)
    t = torch.tensor([nbytes_local], dtype=torch.float64)
    dist.all_reduce(t)
    total_bytes = t.item()
    out = {"tensors": n, "model_gb": round(total_bytes / 1e9, 3), "ranks": world}

    # Baseline: raw write of the same bytes with fsync (one file per rank).
    dist.barrier()
    t0 = time.perf_counter()
    raw = root / "raw"
    raw.mkdir(exist_ok=True)
    with open(raw / f"rank{rank}.bin", "wb") as f:
        for x in local:
            f.write(x.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    raw_s = _max(time.perf_counter() - t0)
    out["raw_write_s"] = raw_s
    out["raw_write_gbps"] = total_bytes / raw_s / 1e9
    dist.barrier()
    if rank == 0:
        shutil.rmtree(raw)

    def torch_async_save(steps):
        """torch's `dcp.async_save`: blocking = until it returns, total = until its future resolves."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        pg = dist.new_group(backend="gloo")  # like the Checkpointer: background collectives on their own group
        res = []
        for step in steps:
            dist.barrier()
            t0 = time.perf_counter()
            fut = dcp.async_save({"model": get_model_state_dict(model)}, checkpoint_id=str(root / f"torch_{step}"),
                                 process_group=pg)
            blocking = _max(time.perf_counter() - t0)
            fut.result()
            total = _max(time.perf_counter() - t0)
            res.append((blocking, total))
        dist.destroy_process_group(pg)
        return res

    def run(mode, steps):
        ck = Checkpointer(CheckpointSpec(save_iter=1, async_mode=mode, keep_last=1), root / mode, model=model)
        res = []
        for step in steps:
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(step)
            blocking = _max(time.perf_counter() - t0)
            ck.wait()
            total = _max(time.perf_counter() - t0)
            res.append((blocking, total))
        ck.close()
        return res

    if loads_only:  # one sync save to load from, then only the cold load / raw read rounds
        run("off", [1])
        out.update(_load_vs_read(model, gb, root, rank, world, repeats))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    (_, _), (b, s) = torch_async_save([1, 2])  # the second: warm, like the pinned modes' later saves
    out["torch_async_save_blocking_s"], out["torch_async_save_total_s"] = b, s
    (b, s), = run("off", [1])
    out["sync_save_s"] = s
    out["sync_save_gbps"] = total_bytes / s / 1e9
    (b, s), = run("async", [1])
    out["async_blocking_s"], out["async_total_s"] = b, s
    (b1, s1), (b2, s2) = run("async_pinned", [1, 2])
    out["async_pinned_first_blocking_s"], out["async_pinned_first_total_s"] = b1, s1
    out["async_pinned_blocking_s"], out["async_pinned_total_s"] = b2, s2

    # Resume throughput: a fresh (uninitialised) model of the same shape loads the sync checkpoint.
    model2, _ = _model(gb)
    ck = Checkpointer(CheckpointSpec(), root / "off", model=model2)
    dist.barrier()
    t0 = time.perf_counter()
    assert ck.load() == 1
    load_s = _max(time.perf_counter() - t0)
    ck.close()
    same = all(torch.equal(a.to_local(), c.to_local()) for a, c in zip(model.parameters(), model2.parameters()))
    out["load_s"], out["load_gbps"], out["load_bitwise_equal"] = load_s, total_bytes / load_s / 1e9, same
    out.update(_load_verify_cost(model2, root / "off", total_bytes))

    out.update(_load_vs_read(model, gb, root, rank, world, repeats))
    out["ratio_sync_vs_raw"] = out["sync_save_gbps"] / out["raw_write_gbps"]
    out["ratio_async_blocking_vs_sync"] = out["async_blocking_s"] / out["sync_save_s"]
    out["ratio_async_pinned_blocking_vs_sync"] = out["async_pinned_blocking_s"] / out["sync_save_s"]
    out["ratio_torch_async_save_blocking_vs_sync"] = out["torch_async_save_blocking_s"] / out["sync_save_s"]
    out["ratio_async_blocking_vs_torch"] = out["async_blocking_s"] / out["torch_async_save_blocking_s"]
    out["ratio_async_pinned_blocking_vs_torch"] = out["async_pinned_blocking_s"] / out["torch_async_save_blocking_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def _load_vs_read(model, gb, root: Path, rank: int, world: int, repeats: int) -> dict:
    """Cold loads against cold raw reads of the same files, `repeats` interleaved pairs, medians.

    Pairs: the DCP files (ranks read them round-robin) vs resume (`Checkpointer.load`); the
    consolidated `.pt` / `.safetensors` (rank 0 reads the file; `split`: every rank reads its
    contiguous 1/world of it at once, the parallelism the sharded load has) vs
    `initialize(load_path=...)`. The page cache of the files is evicted before every side;
    the order of the sides rotates between repeats.
    """
    from cosmos_train.export.consolidate import consolidate

    it_dir = sorted((root / "off" / "checkpoints").glob("iter_*"))[-1]
    dcp_files = sorted(p for p in it_dir.rglob("*") if p.is_file())
    files = {"dcp": dcp_files, "pt": [root / "model.pt"], "safetensors": [root / "model.safetensors"]}
    if rank == 0:
        for fmt in ("pt", "safetensors"):
            consolidate(it_dir, files[fmt][0], progress=False)
    dist.barrier()

    def raw(fmt, split=False):
        mine = [f for i, f in enumerate(files[fmt]) if i % world == rank] if fmt == "dcp" else \
            (files[fmt] if rank == 0 else [])
        t0 = time.perf_counter()
        if split:  # every rank reads its own contiguous 1/world of the file, as the sharded load does
            size = files[fmt][0].stat().st_size
            n = _read(files[fmt][0], rank * size // world, (rank + 1) * size // world)
        else:
            n = sum(_read(f) for f in mine)
        seconds = _max(time.perf_counter() - t0)
        t = torch.tensor([n], dtype=torch.float64)
        dist.all_reduce(t)
        return seconds, t.item()

    def load(fmt):
        gc.collect()  # the previous side's model: a fresh process would not carry it
        fresh, _ = _model(gb)
        ck = Checkpointer(CheckpointSpec(), root / ("off" if fmt == "dcp" else f"init_{fmt}"), model=fresh)
        dist.barrier()
        t0 = time.perf_counter()
        if fmt == "dcp":
            assert ck.load() == 1
        else:
            assert ck.initialize(load_path=str(files[fmt][0]))
        seconds = _max(time.perf_counter() - t0)
        ck.close()
        same = all(torch.equal(a.to_local(), c.to_local()) for a, c in zip(model.parameters(), fresh.parameters()))
        return seconds, same

    out: dict = {}
    for fmt in ("dcp", "pt", "safetensors"):
        ratios, split_ratios, raw_s, split_s, load_s, equal = [], [], [], [], [], True
        sides = ("raw", "load") if fmt == "dcp" else ("raw", "split", "load")
        for r in range(repeats):
            res = {}
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate the order
                _evict(files[fmt])
                dist.barrier()
                res[side] = load(fmt) if side == "load" else raw(fmt, split=side == "split")
            (rs, nbytes), (ls, same) = res["raw"], res["load"]
            equal &= same
            raw_s.append(rs)
            load_s.append(ls)
            ratios.append(rs / ls)  # throughput ratio over the same bytes: raw time / load time
            if "split" in res:
                split_s.append(res["split"][0])
                split_ratios.append(res["split"][0] / ls)
        name = "resume" if fmt == "dcp" else f"load_path_{fmt}"
        out[f"{name}_cold"] = {"raw_read_s": [round(x, 3) for x in raw_s], "load_s": [round(x, 3) for x in load_s],
                               "raw_read_gbps_median": round(nbytes / _median(raw_s) / 1e9, 3),
                               "load_gbps_median": round(nbytes / _median(load_s) / 1e9, 3),
                               "throughput_vs_raw_read": [round(x, 3) for x in ratios],
                               "throughput_vs_raw_read_median": round(_median(ratios), 3),
                               "bitwise_equal": equal}
        if split_s:  # the stricter baseline for a sharded load: every rank reading its part at once
            out[f"{name}_cold"].update({"raw_read_split_s": [round(x, 3) for x in split_s],
                                        "throughput_vs_split_read": [round(x, 3) for x in split_ratios],
                                        "throughput_vs_split_read_median": round(_median(split_ratios), 3)})
    if rank == 0:
        for fmt in ("pt", "safetensors"):
            files[fmt][0].unlink()
    return out


def _load_verify_cost(model, run_dir: Path, total_bytes: float) -> dict:
    """Model-part load: torch's FileSystemReader (no checks) vs SafeReader + CRC check while reading.

    Same checkpoint, page cache warm for both (each measured 3x alternately, best kept).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from cosmos_train.checkpoint.collectives import agree
    from cosmos_train.export.dcp_safe import SafePlanner, SafeReader, verify_reads
    from cosmos_train.layout import read_manifest

    it = run_dir / "checkpoints" / "iter_000000001"
    sd = {"net." + k: v for k, v in get_model_state_dict(model).items()}

    def plain():
        dcp.load(sd, storage_reader=FileSystemReader(it / "model"))

    def verified():
        reader = SafeReader(it / "model")
        dcp.load(sd, storage_reader=reader, planner=SafePlanner(source=it / "model"))
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, reader.segments)
        problems = verify_reads(it, "model", shares, read_manifest(it)) if dist.get_rank() == 0 else None
        assert not agree(problems), problems

    best = {"plain": float("inf"), "verified": float("inf")}
    for _ in range(3):
        for name, fn in (("plain", plain), ("verified", verified)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], _max(time.perf_counter() - t0))
    return {"load_model_torch_s": best["plain"], "load_model_verified_s": best["verified"],
            "load_model_verified_gbps": total_bytes / best["verified"] / 1e9,
            "load_verify_overhead": best["verified"] / best["plain"] - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="model size in GB (fp32)")
    ap.add_argument("--dir", default="/tmp/cosmos_ckpt_bench", help="scratch dir (removed afterwards)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved cold load / raw read pairs (medians)")
    ap.add_argument("--loads-only", action="store_true",
                    help="skip the save measurements: the load rounds run in processes that only saved once")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = 6 * args.gb * 1e9
    if free < need:
        sys.exit(f"need ~{need / 1e9:.1f} GB free under {root}, have {free / 1e9:.1f} GB")
    try:
        res = run_ranks(_bench, args.ranks, str(root), args.gb, args.repeats, args.loads_only, timeout=900)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["device"] = "cpu (gloo)"
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
