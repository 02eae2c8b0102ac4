"""One interface for every stored set of weights: `TensorSource` (entries + `load(names)`).

Implementations: a DCP directory (`dcp_source.DcpSource`), a `.pt` holding a flat
dict (`pt_io.PtSource`), a `.safetensors` file or a sharded set through its
`*.safetensors.index.json` (`safetensors_io.SafetensorsSource`), a diffusers
`transformer/` folder (`diffusers_folder.DiffusersSource`). `open_source(path)`
picks one by what the path is. A new format is one more class with the same three
attributes plus a branch in `open_source`.

File-backed sources read bytes only through `read_range`, the one place a stored
tensor's bytes come off disk (a checksumming read can hook in there).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from cosmos_train.errors import CheckpointError

# What reading stored weights can raise for a bad file (missing, truncated, corrupt) as opposed
# to a bug in this code: those are wrapped into a CheckpointError, anything else keeps its
# traceback. DCP's CheckpointException (per-rank failures) derives from BaseException.
STORAGE_ERRORS = (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, CheckpointException)


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype and shape of one stored tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource(Protocol):
    """Stored tensors, listed without reading data and read a few at a time.

    `entries`: name -> TensorEntry, in stored order. `non_tensor_keys`: stored entries
    that are not tensors (never loaded). `files`: the files read.
    `load(names)` returns full CPU tensors; they stay valid until the next `load`
    call (a source may reuse one buffer), so write, convert or clone them first.
    """

    path: Path
    entries: dict[str, TensorEntry]
    non_tensor_keys: list[str]
    files: list[Path]

    def load(self, names: list[str]) -> dict[str, torch.Tensor]: ...


def describe_failure(e: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (its str() holds whole tracebacks)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, (x, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def read_range(path: Path, offset: int, nbytes: int, *, what: str) -> torch.Tensor:
    """`nbytes` bytes of `path` from `offset` as a new uint8 tensor; a short read is a CheckpointError."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buf
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf.numpy()) != nbytes:
            raise CheckpointError(f"{path}: truncated while reading {what!r}")
    return buf


def open_source(path: str | Path) -> TensorSource:
    """The TensorSource for a DCP dir, a diffusers transformer (or pipeline) folder, a `.pt`/`.pth`,
    a `.safetensors` or a `.safetensors.index.json`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    name = path.name
    if path.is_dir():
        from cosmos_train.export.diffusers_folder import DiffusersSource, find_transformer_dir

        if find_transformer_dir(path) is not None:
            return DiffusersSource(path)
        from cosmos_train.export.dcp_source import DcpSource

        return DcpSource(path)
    if name.endswith((".safetensors.index.json", ".safetensors")):
        from cosmos_train.export.safetensors_io import SafetensorsSource

        return SafetensorsSource(path)
    if name.endswith((".pt", ".pth")):
        from cosmos_train.export.pt_io import PtSource

        return PtSource(path)
    raise CheckpointError(f"{path}: unknown file type; expected .pt, .pth, .safetensors or "
                          f".safetensors.index.json")
