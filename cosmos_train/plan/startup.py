"""The plan's one-line summary for the start of a run (and whether it says the run will not fit)."""

from __future__ import annotations

import os

import torch

from cosmos_train.plan.planner import Hardware, Plan, plan
from cosmos_train.spec import ExperimentSpec


def device_memory(device: torch.device, local_ranks: int) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the host's RAM shared by its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_ranks, 1)


def startup_plan(spec: ExperimentSpec, *, world: int, local_ranks: int, device: torch.device) -> Plan:
    """Plan the run as it is about to start (no fix search, no AC comparison: it must be quick)."""
    hw = Hardware(world=world, gpus_per_node=min(local_ranks, world), gpu_mem=device_memory(device, local_ranks),
                  device_type=device.type)
    return plan(spec, hw, compare_ac=False)


def log_startup_plan(spec: ExperimentSpec, *, world: int, device: torch.device) -> Plan | None:
    """Log the plan's one-line summary (a warning when it says the run will not fit); rank 0 calls it.

    The plan is advice: if it cannot be computed the run goes on, with a warning that names the
    exception's type and message.
    """
    from cosmos_train.runtime.distributed import log, warn

    local_ranks = torch.cuda.device_count() if device.type == "cuda" else world
    try:
        p = startup_plan(spec, world=world, local_ranks=local_ranks, device=device)
    except Exception as e:  # noqa: BLE001 -- advice must never stop a run; the warning names the failure
        warn(f"plan: not computed ({type(e).__name__}: {e})")
        return None
    if p.fits:
        log(p.summary())
    else:
        fix = "" if p.verdict == "tight" else " (`cosmos-train plan SPEC` lists changes that fit)"
        warn(f"{p.summary()} — this run is likely to run out of memory{fix}")
    return p
