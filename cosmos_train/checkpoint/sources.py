"""`checkpoint.load_path` resolution and loading of consolidated weight files.

Accepted sources:
  model.pt / model.safetensors     flat dict; `net.` (regular) / `net_ema.` (EMA) prefixes,
                                   or no prefix at all (then the keys are regular weights)
  RUN/checkpoints/iter_X           a DCP iteration dir (also a checkpoints/ dir or a run dir)
  hf://org/repo[@rev]/path/in/repo a file (or DCP dir) in a Hugging Face repo, fetched with
                                   huggingface_hub into the cache (offline: the cache only)

A full file is opened on rank 0 only (memory-mapped) and every tensor is broadcast
one at a time; each rank keeps its FSDP shard. Peak extra memory per rank is one
full tensor, never the whole model (the upstream "every rank loads the .pt" OOM).
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from cosmos_train.checkpoint import layout
from cosmos_train.errors import CheckpointError
from cosmos_train.models.weights import group_keys

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
FILE_SUFFIXES = (".pt", ".pth", ".safetensors")
REG, EMA = "net.", "net_ema."


@dataclass(frozen=True)
class Source:
    """A resolved load_path: `kind` is "pt", "safetensors" or "dcp" (an iteration dir)."""

    kind: str
    path: Path
    origin: str

    def __str__(self) -> str:
        return self.origin if self.origin == str(self.path) else f"{self.origin} ({self.path})"


# ------------------------------------------------------------------- resolving
def _hf_fetch(spec: str, *, cache_dir: str | Path | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    rest = spec[len(HF_SCHEME):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"{spec}: expected hf://org/repo/path/in/repo (optionally org/repo@revision)")
    org, repo, inner = parts
    repo, _, revision = repo.partition("@")
    repo_id = f"{org}/{repo}"
    if any(c in ("", ".", "..") for c in inner.rstrip("/").split("/")) or "\\" in inner or org in (".", "..") \
            or repo in (".", ".."):
        raise CheckpointError(f"{spec}: the path inside the repo must be plain names (no '.', '..', '//' or "
                              f"'\\'); it may not leave the repository")
    try:
        if inner.endswith(FILE_SUFFIXES):
            return Path(hf_hub_download(repo_id, inner, revision=revision or None, cache_dir=cache_dir,
                                        local_files_only=offline))
        root = snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                 allow_patterns=[f"{inner.rstrip('/')}/**"], local_files_only=offline)
    except Exception as e:  # huggingface_hub raises many types (offline miss, 404, auth)
        hint = " (offline: only the local cache is used; download it once online)" if offline else ""
        raise CheckpointError(f"{spec}: cannot fetch from the Hugging Face Hub: {type(e).__name__}: {e}{hint}") \
            from e
    return inside_snapshot(Path(root), inner, spec)


def inside_snapshot(root: Path, inner: str, spec: str) -> Path:
    """`root/inner`, resolved, and refused unless it stays strictly inside the snapshot `root`.

    (Snapshot files are symlinks into the cache's blobs/, so the lexical path is what is checked.)
    """
    root = Path(os.path.abspath(root))
    target = Path(os.path.normpath(root / inner))
    if target == root or root not in target.parents:
        raise CheckpointError(f"{spec}: resolves to {target}, outside the downloaded snapshot {root}")
    return target


def resolve_load_path(load_path: str | Path, *, cache_dir: str | Path | None = None,
                      offline: bool = False) -> Source:
    """Turn a `checkpoint.load_path` value into a Source; raises CheckpointError if unusable.

    `cache_dir`/`offline` come from the caller's environment ($HF_HOME / HF_HUB_OFFLINE);
    nothing here reads env vars. On several ranks, rank 0 downloads first.
    """
    origin = str(load_path)
    if origin.startswith(HF_SCHEME):
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if multi and dist.get_rank() != 0:
            dist.barrier()
        try:
            path = _hf_fetch(origin, cache_dir=cache_dir, offline=offline)
        finally:
            if multi and dist.get_rank() == 0:
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
    return Source("dcp", layout.resolve_iteration_dir(path), origin)


# ---------------------------------------------------------------------- keys
def matches_prefix(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """True if `key` (or `net.<key>`) starts with one of `prefixes` (keys_not_to_resume)."""
    return any(key.startswith(p) or (REG + key).startswith(p) or (EMA + key).startswith(p) for p in prefixes)


def format_key_problems(missing: list[str], unexpected: list[str], *, source: str, show: int = 5) -> str:
    """A readable error: missing/unexpected keys grouped by block pattern (as `load_weights` shows them)."""
    lines = [f"{source}: checkpoint keys do not match the model "
             f"({len(missing)} missing, {len(unexpected)} unexpected)"]
    for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                        ("unexpected (in the checkpoint, not in the model)", unexpected)):
        if keys:
            lines += [f"  {title}:", textwrap.indent(group_keys(keys, max_groups=show, examples=True), "  ")]
    return "\n".join(lines)


# --------------------------------------------------------------- full files
class _FileReader:
    """Rank-0 access to a flat weight file, one tensor at a time (memory-mapped)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        if source.kind == "safetensors":  # one file, or a sharded set through its index
            from cosmos_train.checkpoint.safetensors_io import SafetensorsReader

            self._st = SafetensorsReader(source.path)
            self.keys = list(self._st.entries)
        else:
            from cosmos_train.checkpoint.pt_io import load_pt

            self._sd = load_pt(source.path, map_location="cpu", mmap=True)
            if not isinstance(self._sd, dict):
                raise CheckpointError(f"{source.path}: expected a flat dict of tensors, got {type(self._sd).__name__}")
            self.keys = [k for k, v in self._sd.items() if isinstance(v, torch.Tensor)]
        # Transformer Engine extra state carries no weights; upstream loaders drop it too.
        self.keys = [k for k in self.keys if not k.endswith("_extra_state")]

    def get(self, key: str) -> torch.Tensor:
        return self._st.read(key) if self.source.kind == "safetensors" else self._sd[key]


def map_keys(model_keys, available: set[str], prefix: str, *, skip=(), optional=lambda k: False
             ) -> tuple[dict[str, str], list[str]]:
    """Map model FQNs to checkpoint keys under `prefix`; returns (mapping, missing).

    A PEFT-injected `x.base_layer.weight` also matches a plain `x.weight` (base model
    files), and LoRA adapter keys are optional when the source has no adapters at all
    (they keep their fresh initialisation). `optional(k)` marks more keys that may be absent.
    """
    has_lora = any("lora_" in a for a in available)
    mapping, missing = {}, []
    for k in model_keys:
        if matches_prefix(k, skip):
            continue
        cands = [prefix + k] + ([prefix + k.replace(".base_layer.", ".")] if ".base_layer." in k else [])
        hit = next((c for c in cands if c in available), None)
        if hit is not None:
            mapping[k] = hit
        elif not (("lora_" in k and not has_lora) or optional(k)):
            missing.append(prefix + k)
    return mapping, missing


def unexpected_keys(available: set[str], used: set[str], prefixes: tuple[str, ...], *, skip=()) -> list[str]:
    """Checkpoint keys under one of `prefixes` that no model key maps to (and are not skipped)."""
    return sorted(k for k in available if k.startswith(prefixes) and k not in used
                  and not matches_prefix(k[len(next(p for p in prefixes if k.startswith(p))):], skip))


def _plan(file_keys: list[str], model_keys: list[str], ema_keys: list[str] | None, *, skip, ema_to_reg: bool,
          lora_only: bool = False) -> tuple[dict, dict, list, list]:
    """Map model/EMA keys to file keys; return (reg_map, ema_map, missing, unexpected)."""
    fk = set(file_keys)
    prefixed = any(k.startswith((REG, EMA)) for k in fk)
    optional = (lambda k: "lora_" not in k) if lora_only else (lambda k: False)
    reg_p = (EMA if ema_to_reg else REG) if prefixed else ""
    reg_map, missing = map_keys(model_keys, fk, reg_p, skip=skip, optional=optional)
    ema_map: dict[str, str] = {}
    if ema_keys is not None and prefixed and any(k.startswith(EMA) for k in fk):
        ema_map, ema_missing = map_keys(ema_keys, fk, EMA, skip=skip, optional=optional)
        missing += ema_missing
    used = set(reg_map.values()) | set(ema_map.values())
    if prefixed:
        unexpected = unexpected_keys(fk, used | ({k for k in fk if k.startswith(REG)} if ema_to_reg else set()),
                                     (REG, EMA) if (ema_map or ema_to_reg) else (REG,), skip=skip)
    else:
        unexpected = unexpected_keys(fk, used, ("",), skip=skip)
    return reg_map, ema_map, missing, unexpected


def _fill(target: dict, key_map: dict, reader: _FileReader | None) -> None:
    """Broadcast each full tensor from rank 0 and keep this rank's shard, in key order."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for k in sorted(key_map):
        t = target[k]
        local = t.to_local() if isinstance(t, DTensor) else t
        if reader is not None:
            full = reader.get(key_map[k]).to(device=local.device, dtype=t.dtype)
            if tuple(full.shape) != tuple(t.shape):
                raise CheckpointError(f"{reader.source.path}: {key_map[k]} has shape {tuple(full.shape)}, "
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


def load_full_weights(source: Source, model: torch.nn.Module, ema=None, *, strict: bool = True,
                      skip: tuple[str, ...] = (), ema_to_reg: bool = False, lora_only: bool = False) -> None:
    """Load a flat `.pt`/`.safetensors` into a (possibly FSDP-sharded) model and EMA.

    Only rank 0 opens the file; shapes are checked; missing/unexpected keys raise
    CheckpointError (a warning when not `strict`). Without `net_ema.` keys the EMA
    starts from the loaded regular weights.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not multi or dist.get_rank() == 0
    msd = get_model_state_dict(model)
    esd = ema.state_dict() if ema is not None else None
    reader, plan = None, None
    if rank0:
        try:
            reader = _FileReader(source)
            plan = _plan(reader.keys, list(msd), list(esd) if esd is not None else None, skip=skip,
                         ema_to_reg=ema_to_reg, lora_only=lora_only)
        except CheckpointError as e:
            plan = str(e)
    if multi:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if isinstance(plan, str):
        raise CheckpointError(plan)
    reg_map, ema_map, missing, unexpected = plan
    if missing or unexpected:
        msg = format_key_problems(missing, unexpected, source=str(source))
        if strict:
            raise CheckpointError(msg + "\n(set checkpoint.strict_resume=false to load anyway, or list prefixes "
                                        "in checkpoint.keys_not_to_resume)")
        log.warning("%s", msg)
    _fill(msd, reg_map, reader)
    set_model_state_dict(model, msd)
    if ema is not None:
        if ema_map:
            _fill(esd, ema_map, reader)
            ema.load_state_dict(esd)
        else:
            log.info("%s has no EMA weights; the EMA starts from the loaded regular weights", source)
            ema.load_state_dict(get_model_state_dict(model))
