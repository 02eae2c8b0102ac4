"""Library side of `cosmos-train inspect`: iterations of a run, tensors of one iteration, deep verify."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from cosmos_train.checkpoint import layout
from cosmos_train.checkpoint.integrity import verify
from cosmos_train.errors import CheckpointError


@dataclass(frozen=True)
class IterationRow:
    step: int
    name: str
    status: str  # committed | partial | upstream
    bytes: int
    mtime: str
    latest: bool


@dataclass(frozen=True)
class TensorRow:
    part: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_iteration_rows(ckpt_dir: str | Path) -> list[IterationRow]:
    """One row per iteration-like dir under `ckpt_dir` (committed, partial, or upstream)."""
    ckpt_dir = Path(ckpt_dir)
    latest = layout.read_latest(ckpt_dir)
    rows = []
    for e in layout.list_iterations(ckpt_dir):
        status = ("committed" if e.committed else "partial" if e.partial else
                  "uncommitted" if e.uncommitted else "upstream")
        mtime = _dt.datetime.fromtimestamp(e.path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        rows.append(IterationRow(e.step, e.path.name, status, _size(e.path), mtime,
                                 latest is not None and e.path == latest))
    return rows


def tensor_rows(iter_dir: str | Path) -> list[TensorRow]:
    """Every tensor of every DCP part of an iteration, from the metadata only (no data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from cosmos_train.checkpoint.dcp_safe import read_metadata

    rows = []
    for part in layout.PARTS:
        d = Path(iter_dir) / part
        if not (d / ".metadata").is_file():
            continue
        md = read_metadata(d)
        for key, m in sorted(md.state_dict_metadata.items()):
            if isinstance(m, TensorStorageMetadata):
                dtype = m.properties.dtype
                numel = 1
                for s in m.size:
                    numel *= s
                rows.append(TensorRow(part, key, tuple(m.size), str(dtype).removeprefix("torch."),
                                      numel * dtype.itemsize))
            else:
                rows.append(TensorRow(part, key, (), "object", 0))
    return rows


def read_back(iter_dir: str | Path) -> list[str]:
    """Read every tensor of every part (one at a time); returns problems naming the part and key."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from cosmos_train.checkpoint.dcp_safe import SafePlanner, SafeReader, read_metadata

    problems = []
    for part in layout.PARTS:
        d = Path(iter_dir) / part
        if not (d / ".metadata").is_file():
            continue
        try:
            md = read_metadata(d)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for key, m in sorted(md.state_dict_metadata.items()):
            if not isinstance(m, TensorStorageMetadata):
                continue
            t = torch.empty(m.size, dtype=m.properties.dtype)
            try:
                dcp.load({key: t}, storage_reader=SafeReader(d),
                         planner=SafePlanner(allow_partial_load=True, source=d), no_dist=True)
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                problems.append(f"{d}: tensor {key} cannot be read ({type(e).__name__})")
    return problems


def deep_verify(iter_dir: str | Path) -> list[str]:
    """Manifest + checksums + DCP metadata checks, then every tensor read back."""
    problems = verify(iter_dir, checksums=True)
    return problems + [p for p in read_back(iter_dir) if p not in problems]


def resolve_for_inspect(path: str | Path) -> tuple[Path | None, Path | None]:
    """(checkpoints dir or None, iteration dir or None) for a run dir, checkpoints dir or iteration dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if layout.looks_like_iteration(p):
        return None, p
    for cand in (p / layout.CHECKPOINTS_DIRNAME, p):
        if cand.is_dir() and layout.list_iterations(cand):
            return cand, None
    raise CheckpointError(f"{p}: no checkpoints found (expected a run dir, a checkpoints/ dir or an iter_X dir)")
