"""How close is `cosmos-train plan` to the real peak memory of a training step? (CPU, gloo)

For a grid of small configurations -- tiny and a wider/deeper variant, full vs LoRA, activation
checkpointing off/on, 1 rank, 2 ranks (FSDP2 over 2), 2 ranks with cp = 2 (ring) -- every rank
measures the peak allocator bytes of one steady-state training step with
`cosmos_train.plan.measure.measure_peak` (torch's profiler records every CPU allocation and
free; the baseline is everything allocated before the model is built), and the planner
predicts it from the spec alone (meta-device trace + sharding arithmetic). Prints one JSON
object per case and a summary; `--markdown` prints the table for benchmarks/README.md.

    python benchmarks/plan_accuracy.py [--markdown] [--only tiny]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from datetime import timedelta

TOLERANCE = 0.15
VARIANTS = {
    "tiny": [],  # D 128, 2 blocks, 4 heads
    "wide": ["model.architecture.model_channels=256", "model.architecture.num_blocks=6"],
}
BASE = ["trainer.device=\"cpu\"", "trainer.precision=\"fp32\"", "data.batch_size=2", "data.num_frames=13",
        "data.video_size=[32, 32]"]


def cases(only: str | None) -> list[dict]:
    out = []
    for variant, arch in VARIANTS.items():
        if only and variant != only:
            continue
        for world, cp in ((1, 1), (2, 1), (2, 2)):
            for train in ("full", "lora"):
                for ac in (False, True):
                    overrides = [*BASE, *arch, f"model.train_architecture=\"{train}\"",
                                 f"parallel.activation_checkpointing={str(ac).lower()}", f"parallel.cp={cp}"]
                    out.append({"variant": variant, "world": world, "cp": cp, "train": train, "ac": ac,
                                "overrides": overrides})
    return out


def _rank_main(rank: int, world: int, port: int, case: dict, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from cosmos_train.plan.measure import measure_peak
    from cosmos_train.runtime.mesh import build_parallel_dims
    from cosmos_train.spec_loading import load_spec

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        spec = load_spec("examples/tiny.toml", case["overrides"])
        dims = build_parallel_dims(spec.parallel, world)
        dims.build_mesh("cpu")
        out_q.put(measure_peak(spec, dims, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def measure(case: dict) -> int:
    """Max over ranks of the case's measured peak.

    Every case gets fresh processes: objects of an earlier case freed (by the garbage
    collector) during a later measurement would blur the allocator's running sum.
    """
    world = case["world"]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, case, q)) for r in range(world)]
    for p in procs:
        p.start()
    peak = max(q.get(timeout=1800) for _ in range(world))
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank exited with {p.exitcode}")
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--only", choices=sorted(VARIANTS))
    args = ap.parse_args()
    from cosmos_train.plan.planner import Hardware, plan
    from cosmos_train.spec_loading import load_spec

    t0 = time.perf_counter()
    todo = cases(args.only)
    for c in todo:
        c["name"] = f"{c['variant']} {c['train']} ac={'on' if c['ac'] else 'off'} world={c['world']} cp={c['cp']}"
    rows = []
    for c in todo:
        spec = load_spec("examples/tiny.toml", c["overrides"])
        p = plan(spec, Hardware(world=c["world"], gpus_per_node=c["world"], gpu_mem=1 << 40, device_type="cpu"))
        m = measure(c)
        row = {"case": c["name"], "measured_mib": round(m / 2**20, 2), "planned_mib": round(p.peak / 2**20, 2),
               "error": round(p.peak / m - 1, 4), "phase": p.peak_phase,
               "model_states_mib": round(p.states.total / 2**20, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    worst = max(abs(r["error"]) for r in rows)
    summary = {"cases": len(rows), "worst_abs_error": worst, "tolerance": TOLERANCE,
               "all_within": worst <= TOLERANCE, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    if args.markdown:
        print("\n| case | measured MiB | planned MiB | error | peak phase | model states MiB |")
        print("|---|---:|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['case']} | {r['measured_mib']} | {r['planned_mib']} | {r['error'] * 100:+.1f} % | "
                  f"{r['phase']} | {r['model_states_mib']} |")
    sys.exit(0 if summary["all_within"] else 1)


if __name__ == "__main__":
    main()
