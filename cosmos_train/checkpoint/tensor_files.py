"""Tensor entries and one-tensor-at-a-time readers for consolidated files (.pt, .safetensors).

`open_tensor_file(path)` picks the reader by extension: `.pt`/`.pth`, `.safetensors`,
or a Hugging Face `*.safetensors.index.json` (sharded safetensors). Every reader has
`entries` (key -> TensorEntry, in file order), `read(key) -> Tensor` and `files`
(the files it reads), and never holds more than the tensor asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cosmos_train.errors import CheckpointError


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype and shape of one stored tensor."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def open_tensor_file(path: str | Path):
    """A reader for a consolidated `.pt`, `.safetensors` or `.safetensors.index.json`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    name = path.name
    if name.endswith(".safetensors.index.json") or name.endswith(".safetensors"):
        from cosmos_train.checkpoint.safetensors_io import SafetensorsReader

        return SafetensorsReader(path)
    if name.endswith((".pt", ".pth")):
        from cosmos_train.checkpoint.pt_io import PtReader

        return PtReader(path)
    raise CheckpointError(f"{path}: unknown file type; expected .pt, .pth, .safetensors or "
                          f".safetensors.index.json")
