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

import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

from cosmos_train.checkpoint.layout import install
from cosmos_train.errors import CosmosTrainError
from cosmos_train.export.consolidate import ConsolidateReport, byte_progress, peak_rss_bytes
from cosmos_train.export.tensor_source import open_source

FORMATS = ("dcp",)


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


def convert(src: str | Path, out_dir: str | Path, *, to: str = "dcp", progress: bool = True) -> ConsolidateReport:
    """Write the consolidated file `src` as the DCP model part of an iteration dir: `out_dir/model/`.

    Keys are kept as stored (`net.*`, `net_ema.*`), so the result loads where a
    training checkpoint's model part does. `out_dir/model` is written under a
    temp name and renamed at the end; an existing one is replaced.
    """
    if to not in FORMATS:
        raise CosmosTrainError(f"--to: unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    reader = open_source(src)
    out_dir = Path(out_dir)
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
