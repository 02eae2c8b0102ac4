"""Library side of `cosmos-train inspect`: iterations of a run, tensors of one iteration or of a consolidated
file (any `TensorSource`), deep verify."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from cosmos_train import layout
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
    from cosmos_train.export.dcp_source import DcpSource

    rows = []
    for part in layout.PARTS:
        d = Path(iter_dir) / part
        if not (d / ".metadata").is_file():
            continue
        src = DcpSource(d, check_files=False)
        rows += [TensorRow(part, e.name, e.shape, str(e.dtype).removeprefix("torch."), e.nbytes)
                 for e in src.entries.values()]
        rows += [TensorRow(part, k, (), "object", 0) for k in src.non_tensor_keys]
    return sorted(rows, key=lambda r: (layout.PARTS.index(r.part), r.name))


def file_tensor_rows(path: str | Path) -> list[TensorRow]:
    """Every tensor of a consolidated `.pt` / `.safetensors` / sharded index, from its header (no data read)."""
    from cosmos_train.export.tensor_source import open_source

    return [TensorRow("file", e.name, e.shape, str(e.dtype).removeprefix("torch."), e.nbytes)
            for e in open_source(path).entries.values()]


def read_back(iter_dir: str | Path) -> list[str]:
    """Read every tensor of every part (one at a time); returns problems naming the part and key."""
    from cosmos_train.export.dcp_source import DcpSource

    problems = []
    for part in layout.PARTS:
        d = Path(iter_dir) / part
        if not (d / ".metadata").is_file():
            continue
        try:
            src = DcpSource(d, check_files=False)
        except CheckpointError as e:
            problems.append(str(e))  # names the file (refused, unreadable, missing shard)
            continue
        for key in sorted(src.entries):
            try:
                src.load([key])
            except CheckpointError as e:
                problems.append(f"{d}: tensor {key} cannot be read ({e.__cause__ and type(e.__cause__).__name__ or e})")
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
