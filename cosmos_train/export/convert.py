"""Consolidated `.pt` / `.safetensors` -> a DCP checkpoint, streamed one tensor at a time.

A DCP checkpoint lets many ranks each read only their shards (`dcp.load` into an
FSDP-sharded model), instead of every rank loading the full file. `dcp.save`
plans from tensor metadata only and asks the planner for each tensor's data just
before writing it (`SavePlanner.resolve_data`), one at a time with a single
writer thread. So the state dict handed to it holds meta tensors, and the
planner reads each real tensor from the source file on demand: peak memory is
one tensor, whatever the model size.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

from cosmos_train import layout
from cosmos_train.layout import MANIFEST_FILE, install
from cosmos_train.errors import CosmosTrainError
from cosmos_train.export.consolidate import ConsolidateReport, byte_progress, peak_rss_bytes
from cosmos_train.export.tensor_source import open_source

FORMATS = ("dcp",)
log = logging.getLogger(__name__)


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; `resolve_data` reads the real tensor from the source file."""

    def __init__(self, reader, on_tensor):
        super().__init__()
        self._reader = reader
        self._on_tensor = on_tensor

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        t = self._reader.load([fqn])[fqn]
        self._on_tensor(t.nbytes)
        return t


def _claim(out_dir: Path, force: bool) -> None:
    """Refuse a committed iteration or a non-empty dir unless `force`; with `force`, un-commit first.

    A committed iteration is un-committed (marker, then manifest removed) *before* its model part
    changes, so no moment has a committed iteration whose manifest does not match its files.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CosmosTrainError(f"{out_dir}: is a file; OUT_DIR must be a directory")
    committed = layout.is_committed(out_dir)
    if not force:
        if committed:
            raise CosmosTrainError(f"{out_dir}: is a committed training checkpoint; converting into it would "
                                   f"replace its weights. Choose a new directory, or pass --force (it is then no "
                                   f"longer a committed checkpoint)")
        if any(out_dir.iterdir()):
            raise CosmosTrainError(f"{out_dir}: directory is not empty; choose a new directory or pass --force "
                                   f"to replace its model/ part")
        return
    if committed:
        (out_dir / layout.COMMITTED_MARKER).unlink()
        layout.fsync_dir(out_dir)
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        log.warning("%s: --force: no longer a committed checkpoint (marker and manifest removed); resume skips "
                    "it, load_path can still name it", out_dir)


def convert(src: str | Path, out_dir: str | Path, *, to: str = "dcp", progress: bool = True,
            force: bool = False) -> ConsolidateReport:
    """Write the consolidated file `src` as the DCP model part of an iteration dir: `out_dir/model/`.

    Keys are kept as stored (`net.*`, `net_ema.*`), so the result loads where a
    training checkpoint's model part does. `out_dir/model` is written under a
    temp name and renamed at the end. A committed iteration or a non-empty dir is
    refused unless `force` (which replaces `model/` and un-commits the iteration).
    """
    if to not in FORMATS:
        raise CosmosTrainError(f"--to: unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    reader = open_source(src)
    out_dir = Path(out_dir)
    _claim(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "model"
    tmp = out_dir / f".model.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(e.nbytes for e in reader.entries.values())
    meta_sd = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in reader.entries.items()}
    p, task = byte_progress(progress, total, f"convert {Path(src).name}")
    try:
        with p, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            planner = _StreamingSavePlanner(reader, lambda n: p.advance(task, n))
            # One writer thread: tensors are resolved (read) one at a time, right before being written.
            dcp.save(meta_sd, storage_writer=FileSystemWriter(tmp, thread_count=1), planner=planner, no_dist=True)
        install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConsolidateReport(out_dir, [final], len(meta_sd), total, time.perf_counter() - t0, peak_rss_bytes())
