"""Benchmark: consolidation against a plain copy of the same bytes, and against torch's converter.

For each checkpoint size (default 2 GB and 4 GB of fp32 tensors shaped like the
2B DiT's: 24 tensors per block at model_channels 2048, plus the embedders, final
layer and buffers), a DCP model part is saved by 2 gloo ranks (dim-0 sharded
DTensors, as FSDP2 writes them) into a committed iteration dir (MANIFEST.json
with every file's CRC32, then COMMITTED, as the Checkpointer writes them). Then,
`--repeats` times, interleaved (the order rotates every repeat, so a drift in
the shared machine's load hits every side):

  cp              `cp -r` of the DCP dir (shard files + .metadata), then fsync of every copied file
  read            reading every shard file once (Python, 16 MiB reads): the read half of a copy
  write_half      writing + fsyncing as many bytes as the bf16 output (the write half of --dtype bf16),
                  with the same write-behind as ours
  ours_pt         consolidate(iter_dir, "model.pt"): the default, every byte checked against the
                  manifest's CRC32s on the way                        (fresh process)
  ours_st         the same to "model.safetensors"                     (fresh process)
  ours_pt_plain   consolidate of the same files without a manifest (hard links: an upstream-style
                  DCP dir): nothing to check, the kernel copies file to file
  ours_bf16_st    consolidate(iter_dir, "model.safetensors", dtype="bf16"), checked
  ours_diffusers  consolidate(iter_dir, "out_diffusers", format="diffusers"), checked: transformer/
                  config.json + diffusion_pytorch_model*.safetensors (5 GB shards) with diffusers' key names

and once per size torch's `dcp_to_torch_save` (.pt) for the no-regression ratio.
Ratios are taken within one repeat (ours / cp of the same repeat) and the median
over repeats is reported; bf16 is compared with read + write_half. `seconds` of a
converter is timed inside its fresh process (start-up and imports excluded), peak
RSS is that process's ru_maxrss; `baseline_rss_gib` is a process that only imports
the same modules. The page cache is warm (the checkpoint was just written and
synced); each side's output is deleted and synced before the next.

    python benchmarks/consolidate.py [--sizes-gb 2,4] [--repeats 3] [--workdir DIR] [--no-torch]

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
# The run's spec (for `--format diffusers`' config.json): the 2B preset with the checkpoint's block count.
SPEC_2B = """[model]
preset = "2b"

[model.tokenizer]
kind = "wan2.1"
path = "hf://nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth"

[model.architecture]
num_blocks = {n_blocks}
"""


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
    """Write a 2-rank DCP checkpoint of the DiT-like state dict to the DCP dir `path`."""
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
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from cosmos_train.export.consolidate import consolidate

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    if tool == "torch":
        dcp_to_torch_save(src, out)
    elif tool == "ours":
        consolidate(src, out, progress=False)
    elif tool == "ours_bf16":
        consolidate(src, out, progress=False, dtype="bf16")
    elif tool == "ours_diffusers":
        consolidate(src, out, progress=False, format="diffusers")
    elif tool != "baseline":
        raise ValueError(tool)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": rss}))


def save_committed(iter_dir: Path, plain: Path, n_blocks: int) -> Path:
    """A committed iteration dir (`model/` + MANIFEST.json + COMMITTED) in a run dir whose spec.toml is
    the 2B preset with `n_blocks` blocks (for `--format diffusers`), and `plain`: hard links of its DCP files."""
    from cosmos_train.checkpoint.integrity import data_files, file_entry, write_manifest
    from cosmos_train.layout import COMMITTED_MARKER, SPEC_FILE

    run_dir = iter_dir.parent.parent
    run_dir.mkdir(parents=True)
    (run_dir / SPEC_FILE).write_text(SPEC_2B.format(n_blocks=n_blocks))
    save_checkpoint(iter_dir / "model", n_blocks)
    write_manifest(iter_dir, {rel: file_entry(iter_dir, rel) for rel in data_files(iter_dir)})
    (iter_dir / COMMITTED_MARKER).write_text("")
    plain.mkdir()
    for f in (iter_dir / "model").iterdir():
        os.link(f, plain / f.name)
    return iter_dir


def run_fresh(tool: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", tool, str(src), str(out)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(f"{tool} -> {out.name} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in _files(out)) if out.is_dir() else out.stat().st_size if out.exists() else 0
    _remove(out)
    return {"seconds": r["seconds"], "peak_rss_gib": r["peak_rss_bytes"] / 2**30, "output_bytes": size}


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    os.sync()  # flush this run's dirty pages so they do not slow the next one


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def cp_fsync(src: Path, dst: Path) -> dict:
    """`cp -r` + fsync of every copied file: the physical limit of a consolidation without a dtype change."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    for f in _files(dst):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - t0
    _remove(dst)
    return {"seconds": seconds}


def read_all(src: Path) -> dict:
    """Read every file of the checkpoint once, 16 MiB at a time, into one reused buffer."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in _files(src):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                n += k
    return {"seconds": time.perf_counter() - t0, "bytes": n}


def write_bytes(dst: Path, nbytes: int) -> dict:
    """Write `nbytes` (random, 16 MiB at a time) to a new file and fsync it, with write-behind.

    Write-behind (`cosmos_train.write_behind`, as the consolidation uses) makes this the
    fastest way to write those bytes we know of here: a plain write + fsync took 2-3x longer.
    """
    from cosmos_train.write_behind import WriteBehind

    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(dst, "wb", buffering=0) as f:
        behind, done = WriteBehind(f.fileno()), 0
        while done < nbytes:
            n = f.write(memoryview(block)[:min(nbytes - done, len(block))])
            behind.written(done, n)
            done += n
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    _remove(dst)
    return {"seconds": seconds}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def bench_size(work: Path, size: float, repeats: int, with_torch: bool, baseline_rss: float,
               only: list[str] | None = None) -> dict:
    n_blocks = blocks_for(size)
    shapes = dit_like_shapes(n_blocks)
    it_dir, ckpt = work / f"run_{size:g}gb" / "checkpoints" / "iter_000000001", work / f"plain_{size:g}gb"
    t0 = time.perf_counter()
    save_committed(it_dir, ckpt, n_blocks)
    os.sync()
    save_s = time.perf_counter() - t0
    model_bytes = _nbytes(shapes)
    largest = max(_nbytes([s]) for s in shapes)
    shard_bytes = sum(f.stat().st_size for f in _files(ckpt))
    bf16_bytes = model_bytes // 2  # every fp32 tensor halves (the two int64 scalars are noise)
    sides = {
        "cp": lambda: cp_fsync(ckpt, work / "cp_copy"),
        "read": lambda: read_all(ckpt),
        "write_half": lambda: write_bytes(work / "half.bin", bf16_bytes),
        "ours_pt": lambda: run_fresh("ours", it_dir, work / "out.pt"),
        "ours_st": lambda: run_fresh("ours", it_dir, work / "out.safetensors"),
        "ours_pt_plain": lambda: run_fresh("ours", ckpt, work / "out.pt"),
        "ours_bf16_st": lambda: run_fresh("ours_bf16", it_dir, work / "out_bf16.safetensors"),
        "ours_diffusers": lambda: run_fresh("ours_diffusers", it_dir, work / "out_diffusers"),
    }
    names = [k for k in sides if only is None or k in only]
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            runs[k].append(sides[k]())
    pairs = {"pt_over_cp": (["ours_pt"], ["cp"]), "st_over_cp": (["ours_st"], ["cp"]),
             "pt_plain_over_cp": (["ours_pt_plain"], ["cp"]),
             "diffusers_over_cp": (["ours_diffusers"], ["cp"]), "read_over_cp": (["read"], ["cp"]),
             "bf16_over_read_plus_write": (["ours_bf16_st"], ["read", "write_half"])}
    ratios = {name: [sum(runs[k][i]["seconds"] for k in num) / sum(runs[k][i]["seconds"] for k in den)
                     for i in range(repeats)]
              for name, (num, den) in pairs.items() if all(k in runs for k in num + den)}
    out = {
        "size_gb": round(model_bytes / 1e9, 3), "shard_bytes_gb": round(shard_bytes / 1e9, 3), "tensors": len(shapes),
        "blocks": n_blocks, "largest_tensor_mib": round(largest / 2**20, 1), "checkpoint_save_s": round(save_s, 1),
        "median_seconds": {k: round(_median([x["seconds"] for x in v]), 3) for k, v in runs.items()},
        "all_seconds": {k: [round(x["seconds"], 3) for x in v] for k, v in runs.items()},
        "median_ratio": {k: round(_median(v), 3) for k, v in ratios.items()},
        "all_ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "peak_rss_above_baseline_over_largest_tensor": {
            k: round(max(x["peak_rss_gib"] for x in runs[k]) * 2**30 / largest - baseline_rss * 2**30 / largest, 2)
            for k in names if k.startswith("ours")},
        "peak_rss_gib": {k: round(max(x["peak_rss_gib"] for x in runs[k]), 3) for k in names if k.startswith("ours")},
    }
    if with_torch:
        t = run_fresh("torch", ckpt, work / "torch.pt")  # torch reads the plain DCP dir
        out["torch_dcp_to_torch_save"] = {"seconds": round(t["seconds"], 3),
                                          "peak_rss_gib": round(t["peak_rss_gib"], 3)}
        if "ours_pt" in out["median_seconds"]:
            out["ours_pt_over_torch"] = round(out["median_seconds"]["ours_pt"] / t["seconds"], 3)
    _remove(ckpt)
    _remove(it_dir.parent.parent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", default="2,4", help="checkpoint sizes in GB (10^9 bytes), comma separated")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's dcp_to_torch_save")
    ap.add_argument("--only", default=None, help="comma-separated sides to run (default: all), e.g. cp,ours_pt")
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
            results.append(bench_size(work, size, args.repeats, not args.no_torch, baseline["peak_rss_gib"],
                                      args.only.split(",") if args.only else None))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "consolidate",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": os.getloadavg()},
        "torch": __import__("torch").__version__,
        "baseline_rss_gib": round(baseline["peak_rss_gib"], 3),
        "repeats": args.repeats,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
