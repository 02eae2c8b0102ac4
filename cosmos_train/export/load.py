"""Weights into a model: `load_path` resolution, then one loader for every source kind.

Accepted sources:
  model.pt / model.safetensors     flat dict; `net.` (regular) / `net_ema.` (EMA) prefixes,
                                   or no prefix at all (then the keys are regular weights)
  RUN/checkpoints/iter_X           a DCP iteration dir (also a checkpoints/ dir or a run dir)
  DIR/transformer or DIR           a diffusers CosmosTransformer3DModel folder (or a pipeline
                                   folder holding one under transformer/)
  hf://org/repo[@rev]/path/in/repo a file (or DCP dir) in a Hugging Face repo, fetched with
                                   huggingface_hub into the cache (offline: the cache only)
  hf://org/repo[@rev]              a diffusers pipeline repo: its transformer/ subfolder

`load_weights` plans the keys once on rank 0 (`export.keys.plan_keys`) and shares the
plan. A DCP directory is then read by every rank for its own shards (`dcp.load`
reshards). A full file (`.pt`, `.safetensors`, diffusers) is planned on rank 0; when every
rank sees the same file, each rank reads just its FSDP shard's byte range straight
into its parameters (`shard_read`: the file is read once in total, no rank holds a
full tensor); otherwise (or for a tensor whose bytes are not contiguous in the file)
rank 0 reads one tensor at a time and broadcasts it, each rank keeping its shard.
Peak extra memory per rank is at most one full tensor, never the whole model (the
upstream "every rank loads the .pt" OOM). Resume, initialisation and infer all load through here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from cosmos_train import layout
from cosmos_train.errors import CheckpointError, CorruptCheckpointError
from cosmos_train.export.keys import KeyPlan, format_key_problems, plan_keys
from cosmos_train.export.tensor_source import STORAGE_ERRORS, TensorSource, describe_failure, open_source
from cosmos_train.hub import HF_SCHEME, hf_fetch
from cosmos_train.runtime.distributed import dist_on, rank, world_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A resolved load_path: `kind` is "pt", "safetensors", "dcp" (an iteration dir) or "diffusers"."""

    kind: str
    path: Path
    origin: str

    def __str__(self) -> str:
        return self.origin if self.origin == str(self.path) else f"{self.origin} ({self.path})"


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: a load allocates many small objects (metadata, plans), and
    each gen-2 collection walks every object of a training process (0.2 s per collection measured
    in the 1 GB resume benchmark, once or twice per load). Reference counting still frees as usual.
    Also a decorator (`@gc_paused()`)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ------------------------------------------------------------------- resolving
def _hf_fetch(spec: str, *, cache_dir: str | Path | None, offline: bool) -> Path:
    """`hf://org/repo` alone names a diffusers repo: its transformer folder; the rest is `hub.hf_fetch`."""
    rest = spec[len(HF_SCHEME):].rstrip("/")
    parts = rest.split("/", 2)
    if len(parts) == 2 and all(parts):  # a diffusers repo: its transformer
        from cosmos_train.export.diffusers import TRANSFORMER_SUBFOLDER

        spec = f"{HF_SCHEME}{rest}/{TRANSFORMER_SUBFOLDER}"
    return hf_fetch(spec, cache_dir=cache_dir, offline=offline)


def resolve_load_path(load_path: str | Path, *, cache_dir: str | Path | None = None,
                      offline: bool = False) -> Source:
    """Turn a `checkpoint.load_path` value into a Source; raises CheckpointError if unusable.

    `cache_dir`/`offline` come from the caller's environment ($HF_HOME / HF_HUB_OFFLINE);
    nothing here reads env vars. On several ranks, rank 0 downloads first.
    """
    origin = str(load_path)
    if origin.startswith(HF_SCHEME):
        multi, rank = _world()
        if multi and rank != 0:
            dist.barrier()
        try:
            path = _hf_fetch(origin, cache_dir=cache_dir, offline=offline)
        finally:
            if multi and rank == 0:
                dist.barrier()
    else:
        path = Path(load_path).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            return Source("safetensors", path, origin)
        if path.suffix in (".pt", ".pth"):
            return Source("pt", path, origin)
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected .pt, .pth or "
                              f".safetensors, a DCP iteration dir or a run dir")
    from cosmos_train.export.diffusers_folder import find_transformer_dir

    transformer = find_transformer_dir(path) if path.is_dir() else None
    if transformer is not None:
        return Source("diffusers", transformer, origin)
    return Source("dcp", layout.resolve_iteration_dir(path), origin)


# --------------------------------------------------------------------- loading
def _world() -> tuple[bool, int]:
    multi = world_size() > 1
    return multi, rank() if multi else 0


def _share(value, multi: bool):
    """Rank 0's value on every rank."""
    if multi:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _fill(target: dict, key_map: dict, reader: TensorSource | None, multi: bool) -> None:
    """Broadcast each full tensor from rank 0 and keep this rank's shard, in key order."""
    for k in sorted(key_map):
        t = target[k]
        local = _local(t)
        if reader is not None:
            full = reader.load([key_map[k]])[key_map[k]].to(device=local.device, dtype=t.dtype)
            if tuple(full.shape) != tuple(t.shape):
                raise CheckpointError(f"{reader.path}: {key_map[k]} has shape {tuple(full.shape)}, "
                                      f"the model expects {tuple(t.shape)}")
        else:
            full = torch.empty(t.shape, dtype=t.dtype, device=local.device)
        if multi:
            dist.broadcast(full, src=0)
        if isinstance(t, DTensor):
            # No communication: every rank already holds the full tensor; take the local shard.
            shard = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
            local.copy_(shard)
        else:
            local.copy_(full)
        del full


def _aliases_model(sd: dict, model: torch.nn.Module) -> bool:
    """True if every tensor of `sd` is (a view of the whole of) one of the model's parameters or buffers."""
    key = lambda t: (t.data_ptr(), t.numel(), t.dtype)  # noqa: E731
    live = {key(_local(t)) for t in [*model.parameters(), *model.buffers()]}
    return all(key(_local(x)) in live for x in sd.values() if isinstance(x, torch.Tensor))


def _read_file(target: dict, key_map: dict, reader: TensorSource | None, multi: bool) -> list[str]:
    """Every rank reads its shards straight from the file when all ranks see it (`shard_read`); the
    tensors that cannot be read that way go through rank 0 and a broadcast (`_fill`): returns those."""
    from cosmos_train.export import shard_read

    found, ids = {}, {}
    if reader is not None:
        try:
            found = shard_read.spans(reader, sorted(set(key_map.values())))
            ids = shard_read.file_ids(found)
        except OSError:  # the file went away since it was opened: the broadcast path reports it
            found, ids = {}, {}
    found, ids = _share((found, ids), multi)
    if found and shard_read.all_ranks(shard_read.sees_same_files(ids)):
        key_map = {k: key_map[k] for k in shard_read.read_into(target, key_map, found)}
    _fill(target, key_map, reader, multi)
    return sorted(key_map)


def _read_dcp(part_dir: Path, msd: dict, esd: dict | None, plan: KeyPlan) -> None:
    """Every rank reads its own shards of the planned keys straight into `msd` / `esd`."""
    import torch.distributed.checkpoint as dcp

    from cosmos_train.export.dcp_safe import SafePlanner, SafeReader, check_reads_on_all_ranks, is_damage

    request = {ck: msd[k] for k, ck in plan.reg.items()}
    if esd is not None and plan.ema is not None:
        request.update({ck: esd[k] for k, ck in plan.ema.items()})
    no_dist = not dist_on()
    try:
        with warnings.catch_warnings():
            # no_dist is deliberate for one process; DCP warns that it assumes a single process.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            reader = SafeReader(part_dir)  # runs no code from the files, checksums what it reads
            dcp.load(request, storage_reader=reader, planner=SafePlanner(source=part_dir), no_dist=no_dist)
    except STORAGE_ERRORS as e:
        err = CorruptCheckpointError if is_damage(e) else CheckpointError
        raise err(f"{part_dir}: reading the model weights failed: {describe_failure(e)}") from e
    check_reads_on_all_ranks(part_dir.parent, {part_dir.name: reader.segments})


@gc_paused()
def load_weights(source: Source, model: torch.nn.Module, ema=None, *, strict: bool = True,
                 skip: tuple[str, ...] = (), ema_to_reg: bool = False, ema_required: bool = False,
                 adapters_only: bool = False) -> None:
    """Load a resolved source into a (possibly FSDP-sharded) model and an EMA keyed like it.

    Shapes are checked; missing/unexpected keys raise CheckpointError (a warning
    when not `strict`). Without `net_ema.` keys (and not `ema_required`) the EMA
    starts from the loaded regular weights. Collective under torch.distributed.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    multi, rank = _world()
    if source.kind == "diffusers" and hasattr(model, "cfg"):
        from cosmos_train.export.diffusers_folder import check_architecture, read_dit_config

        check_architecture(read_dit_config(source.path), model.cfg, source=str(source))
    msd = get_model_state_dict(model)
    esd = ema.state_dict() if ema is not None else None
    where = source.path / "model" if source.kind == "dcp" else source.path
    reader, plan = None, None
    if rank == 0:
        try:
            reader = open_source(where)
            plan = plan_keys(reader.entries, list(msd), list(esd) if esd is not None else None, skip=skip,
                             ema_to_reg=ema_to_reg, ema_required=ema_required, adapters_only=adapters_only)
        except CheckpointError as e:
            plan = str(e)
    plan = _share(plan, multi)
    if isinstance(plan, str):
        raise CheckpointError(plan)
    if plan.missing or plan.unexpected:
        msg = format_key_problems(plan.missing, plan.unexpected, source=str(source))
        if strict:
            raise CheckpointError(msg + "\n(set checkpoint.strict_resume=false to load anyway, or list prefixes "
                                        "in checkpoint.keys_not_to_resume)")
        if rank == 0:
            log.warning("%s", msg)
    if source.kind == "dcp":
        _read_dcp(where, msd, esd, plan)
    else:
        _read_file(msd, plan.reg, reader, multi)
        if esd is not None and plan.ema is not None:
            _read_file(esd, plan.ema, reader, multi)
    if not _aliases_model(msd, model):  # else the reads above already wrote the parameters themselves
        set_model_state_dict(model, msd)
    if ema is not None:
        if plan.ema is not None:
            ema.load_state_dict(esd)
        else:
            if rank == 0:
                log.info("%s has no EMA weights; the EMA starts from the loaded regular weights", source)
            ema.load_state_dict(get_model_state_dict(model))
