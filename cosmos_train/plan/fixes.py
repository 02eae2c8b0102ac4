"""The cheapest changes that make a plan fit, found by re-planning each candidate.

Every candidate is a set of spec overrides; each is planned in full (nothing is estimated from
rules of thumb) and kept when its peak fits. Candidates are tried from the cheapest in
throughput or training behaviour to the most intrusive:

1. `parallel.reshard_after_forward = true`   (one more all-gather per block in backward)
2. `trainer.precision = "bf16"`               (half-size gathered params and activations)
3. `parallel.dp_replicate = 1`                (HSDP -> FSDP: shard over all ranks)
4. `checkpoint.async_mode = "off"`            (CPU runs: no staged copy in device memory)
5. `parallel.activation_checkpointing = true` (recompute each block: ~1/3 more compute)
6. a larger `parallel.cp`                     (more communication per block)
7. half `data.batch_size`, twice `trainer.grad_accum_iter` (same samples per step, less overlap)
8. `model.train_architecture = "lora"`        (changes what is trained)

When no single change fits, pairs of them are tried in the same order.
"""

from __future__ import annotations

from itertools import combinations

from cosmos_train.errors import CosmosTrainError
from cosmos_train.plan.planner import GiB, Hardware, Plan, plan, with_overrides
from cosmos_train.spec import ExperimentSpec


def _next_cp(spec: ExperimentSpec, world: int) -> int | None:
    """The smallest cp above the current one that the spec and the world size allow."""
    par, heads = spec.parallel, spec.model.dit_config().num_heads
    for cp in range(par.cp + 1, spec.data.latent_frames + 1):
        if spec.data.latent_frames % cp or world % (par.dp_replicate * cp):
            continue
        if par.dp_shard != -1 and par.dp_replicate * par.dp_shard * cp != world:
            continue
        if par.cp_mode == "a2a" and heads % cp:
            continue
        if par.cp_mode == "hybrid" and cp % par.cp_a2a_degree:
            continue
        return cp
    return None


def candidates(spec: ExperimentSpec, hw: Hardware) -> list[tuple[str, list[str]]]:
    """(label, overrides) of the single changes that apply to this spec, cheapest first."""
    par, out = spec.parallel, []
    if not par.reshard_after_forward:
        out.append(("parallel.reshard_after_forward = true", ["parallel.reshard_after_forward=true"]))
    if spec.trainer.precision == "fp32" or (spec.trainer.precision == "auto" and hw.device_type == "cpu"):
        out.append(('trainer.precision = "bf16"', ['trainer.precision="bf16"']))
    if par.dp_replicate > 1:
        out.append(("parallel.dp_replicate = 1", ["parallel.dp_replicate=1", "parallel.dp_shard=-1"]))
    if spec.checkpoint.async_mode != "off" and hw.device_type == "cpu":
        out.append(('checkpoint.async_mode = "off"', ['checkpoint.async_mode="off"']))
    if not par.activation_checkpointing:
        out.append(("parallel.activation_checkpointing = true", ["parallel.activation_checkpointing=true"]))
    cp = _next_cp(spec, hw.world)
    if cp is not None:
        over = [f"parallel.cp={cp}"] + (["parallel.dp_shard=-1"] if par.dp_shard != -1 else [])
        out.append((f"parallel.cp {par.cp} -> {cp}", over))
    if spec.data.batch_size > 1:
        b, acc = spec.data.batch_size // 2, spec.trainer.grad_accum_iter * 2
        out.append((f"data.batch_size {spec.data.batch_size} -> {b}, trainer.grad_accum_iter -> {acc}",
                    [f"data.batch_size={b}", f"trainer.grad_accum_iter={acc}"]))
    if spec.model.train_architecture == "full":
        out.append(('model.train_architecture = "lora"', ['model.train_architecture="lora"']))
    return out


def _try(spec: ExperimentSpec, hw: Hardware, overrides: list[str]) -> Plan | None:
    try:
        return plan(with_overrides(spec, overrides), hw, compare_ac=False)
    except CosmosTrainError:  # e.g. the change makes the spec invalid for this world size
        return None


def find_fixes(p: Plan, *, limit: int = 3) -> list[dict]:
    """Up to `limit` changes (single, else pairs) whose plan fits; each with its computed delta."""
    if p.fits:
        return []
    singles = candidates(p.spec, p.hw)
    found: list[dict] = []
    tried: dict[str, Plan | None] = {}
    for label, over in singles:
        q = tried[label] = _try(p.spec, p.hw, over)
        if q is not None and q.fits:
            found.append(_describe([label], q, p))
            if len(found) >= limit:
                return found
    if found:
        return found
    for (la, oa), (lb, ob) in combinations(singles, 2):
        q = _try(p.spec, p.hw, oa + ob)
        if q is not None and q.fits:
            found.append(_describe([la, lb], q, p))
            if len(found) >= limit:
                break
    return found


def _describe(labels: list[str], q: Plan, p: Plan) -> dict:
    delta = q.peak - p.peak
    extra = []
    if q.staging_host != p.staging_host:
        extra.append(f"host staging {(q.staging_host - p.staging_host) / GiB:+.1f} GiB")
    return {"change": " + ".join(labels), "peak_bytes": q.peak, "delta_bytes": delta,
            "text": f"{' + '.join(labels)} ({delta / GiB:+.1f} GiB -> peak {q.peak / GiB:.1f} GiB"
                    + (", " + ", ".join(extra) if extra else "") + ")"}
