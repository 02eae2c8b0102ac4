"""Crafted checkpoint files for the security tests: pickles that would create a marker file if run."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from cosmos_train.checkpoint.integrity import data_files, file_entry, write_manifest


class Payload:
    """Unpickling this runs `open(marker, "w")`: the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def hostile_metadata(part_dir: Path, marker: Path) -> None:
    """Replace `part_dir/.metadata` with a pickle that runs code."""
    (part_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def hostile_trainer_part(iter_dir: Path, marker: Path) -> None:
    """Rewrite `trainer/` with a `step` item whose torch.save pickle runs code."""
    part = iter_dir / "trainer"
    for f in part.iterdir():
        f.unlink()
    dcp.save({"step": Payload(marker), "seed": 0, "world_size": 1}, storage_writer=FileSystemWriter(part),
             no_dist=True)


def reseal(iter_dir: Path) -> None:
    """Rewrite MANIFEST.json to match the files (what an attacker who edits files can also do)."""
    write_manifest(iter_dir, {rel: file_entry(iter_dir, rel) for rel in data_files(iter_dir)})


def hostile_pt(path: Path, marker: Path) -> None:
    """A `.pt` whose pickle runs code (torch.save of an object with a __reduce__)."""
    torch.save({"net.x": Payload(marker)}, path)
