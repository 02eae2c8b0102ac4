"""`plan`: will this spec fit, and what will its checkpoints cost, before any GPU is allocated."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from cosmos_train.cli.common import OverridesArg, SpecArg, console, handle_errors
from cosmos_train.errors import CosmosTrainError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '141GB', '24 GiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise CosmosTrainError(f"--gpu-mem: expected a size like 80GiB or 141GB (got {text!r})")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:
        raise CosmosTrainError(f"--gpu-mem: expected a size like 80GiB or 141GB (got {text!r})") from None


@handle_errors
def plan(
    spec: SpecArg,
    overrides: OverridesArg = None,
    world: Annotated[int | None, typer.Option(help="Total ranks (GPUs).", min=1)] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes (with --gpus-per-node).", min=1)] = None,
    gpus_per_node: Annotated[int, typer.Option(help="Ranks per node.", min=1)] = 8,
    gpu_mem: Annotated[str, typer.Option(help="Memory per device, e.g. 80GiB, 141GB.")] = "80GiB",
    disk_gbps: Annotated[float, typer.Option(help="Checkpoint write bandwidth per node, GB/s.", min=1e-6)] = 2.0,
    measure_disk: Annotated[bool, typer.Option("--measure-disk",
                                               help="Measure the write bandwidth of the run's output dir.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    fixes: Annotated[bool, typer.Option(help="Search for changes that make a plan fit.")] = True,
) -> None:
    """Per-rank memory, checkpoint sizes and a fit verdict for a spec at a world size.

    Example: cosmos-train plan examples/14b_lora.toml --nodes 4 --gpus-per-node 8 --gpu-mem 80GiB
    """
    from cosmos_train.plan.fixes import find_fixes
    from cosmos_train.plan.planner import Hardware, plan as make_plan
    from cosmos_train.plan.report import tables, to_json
    from cosmos_train.spec_loading import load_spec

    if world is not None and nodes is not None:
        raise CosmosTrainError("give --world N or --nodes N --gpus-per-node G, not both")
    resolved = load_spec(spec, overrides or [])
    if world is None:
        if nodes is not None:
            world = nodes * gpus_per_node
        else:
            par = resolved.parallel
            world = par.dp_replicate * par.cp * max(par.dp_shard, 1)
    gpus_per_node = min(gpus_per_node, world)
    if measure_disk:
        from cosmos_train.plan.disk import measure_write_gbps

        disk_gbps = measure_write_gbps(resolved.run_dir().parent)
    device_type = "cpu" if resolved.trainer.device == "cpu" else "cuda"
    hw = Hardware(world=world, gpus_per_node=gpus_per_node, gpu_mem=parse_size(gpu_mem), disk_gbps=disk_gbps,
                  device_type=device_type)
    p = make_plan(resolved, hw)
    if fixes:
        p.fixes = find_fixes(p)
    if as_json:
        typer.echo(json.dumps(to_json(p), indent=2))
        return
    for table in tables(p):
        console.print(table)
