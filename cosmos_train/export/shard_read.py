"""Every rank reads its own shard of each tensor straight from a weights file: no full tensor, no broadcast.

A `.pt` / `.safetensors` (or diffusers folder) stores each tensor's bytes contiguously,
row-major, and FSDP2 shards parameters on dim 0, so a rank's shard is one byte range
of the file: rows `[r0, r0 + n)` of the tensor. When every rank sees the same file
(same size and mtime: a local disk on one node, a shared file system on several),
each rank reads just that range with `preadv` straight into its local shard (a
cast or a device copy goes through a small staging buffer). The file is read once
in total, across ranks, and no rank ever holds more than its shards.

Tensors whose bytes cannot be located (a strided `.pt` view, a computed buffer) and
sources that some rank cannot see fall back to the rank-0 read + broadcast in
`load.py`. Every rank reports how its reads went before anyone goes on, so a
failure on one rank is an error on all (and a rank's own exception keeps its
traceback).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cosmos_train.errors import CheckpointError
from cosmos_train.export.pread import preadv_all
from cosmos_train.export.tensor_source import TensorSource
from cosmos_train.runtime.distributed import rank, world_size

THREADS = 2  # one read in flight while another rank-local copy or cast runs


@dataclass(frozen=True)
class Span:
    """Where a stored tensor's raw bytes lie."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def spans(reader: TensorSource, names: list[str]) -> dict[str, Span]:
    """The locatable ones of `names` (a source without `locate` has none)."""
    locate = getattr(reader, "locate", None)
    out = {}
    for n in names if locate is not None else ():
        where = locate(n)
        if where is not None:
            e = reader.entries[n]
            out[n] = Span(str(where[0]), where[1], where[2], e.dtype, e.shape)
    return out


def file_ids(found: dict[str, Span]) -> dict[str, tuple[int, int]]:
    """`{file: (size, mtime_ns)}` of the files the spans point into."""
    out = {}
    for f in {s.file for s in found.values()}:
        st = os.stat(f)
        out[f] = (st.st_size, st.st_mtime_ns)
    return out


def sees_same_files(ids: dict[str, tuple[int, int]]) -> bool:
    """True if this process sees every file with the given size and mtime."""
    try:
        return all((os.stat(f).st_size, os.stat(f).st_mtime_ns) == tuple(v) for f, v in ids.items())
    except OSError:
        return False


def _gathered(value) -> list:
    """Every rank's `value`, on every rank (works on gloo and NCCL groups)."""
    if world_size() == 1:
        return [value]
    got = [None] * world_size()
    dist.all_gather_object(got, value)
    return got


def all_ranks(value: bool) -> bool:
    """True if `value` is True on every rank."""
    return all(_gathered(value))


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """`(local tensor, first row in the full tensor)` if this rank's part is a dim-0 slab, else None."""
    if not isinstance(t, DTensor):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        return None
    return local, (offset[0] if t.ndim else 0)


def _read_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    if preadv_all(fd, [view], offset) < len(view):
        raise CheckpointError(f"{what}: the file ends before the tensor's bytes do (truncated)")


def read_into(target: dict, key_map: dict[str, str], found: dict[str, Span]) -> list[str]:
    """Read this rank's part of every `target[k]` from `found[key_map[k]]`; keys left for the broadcast path.

    Raises CheckpointError (on every rank alike) for a shape mismatch; collective.
    """
    plans, rest = [], []
    for k in sorted(key_map):
        span, t = found.get(key_map[k]), target[k]
        if span is not None and span.shape != tuple(t.shape):
            raise CheckpointError(f"{span.file}: {key_map[k]} has shape {span.shape}, the model expects "
                                  f"{tuple(t.shape)}")
        rows = None if span is None else _rows(t)
        if rows is None:
            rest.append(k)
        else:
            plans.append((key_map[k], span, *rows))
    error: BaseException | None = None
    try:
        _read_all(plans)
    except BaseException as e:  # noqa: BLE001 - reported to every rank below, re-raised here as is
        error = e
    failures = _gather_failures(error)
    if error is not None:
        raise error
    if failures:
        raise CheckpointError(failures[0])
    return rest


def _read_all(plans) -> None:
    fds: dict[str, int] = {}
    try:
        for _, span, _, _ in plans:
            if span.file not in fds:
                fds[span.file] = os.open(span.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):  # a larger readahead window (measured best of the three)
                    os.posix_fadvise(fds[span.file], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with ThreadPoolExecutor(THREADS, thread_name_prefix="shard-read") as pool:
            for f in [pool.submit(_read_one, fds[span.file], name, span, local, row0)
                      for name, span, local, row0 in plans]:
                f.result()
    finally:
        for fd in fds.values():
            os.close(fd)


def _read_one(fd: int, name: str, span: Span, local: torch.Tensor, row0: int) -> None:
    if local.numel() == 0:
        return
    row_bytes = span.nbytes // span.shape[0] if span.shape and span.shape[0] else span.nbytes
    nbytes = local.numel() * span.dtype.itemsize
    start = span.offset + row0 * row_bytes
    if start + nbytes > span.offset + span.nbytes:
        raise AssertionError(f"{name}: local rows past the tensor's end")  # a bug in the slab maths
    what = f"{span.file}: {name!r}"
    if local.device.type == "cpu" and local.is_contiguous() and local.dtype == span.dtype:
        _read_exact(fd, memoryview(local.reshape(-1).view(torch.uint8).numpy()), start, what)
        return
    staged = torch.empty(nbytes, dtype=torch.uint8)
    _read_exact(fd, memoryview(staged.numpy()), start, what)
    local.copy_(staged.view(span.dtype).view(local.shape))


def _gather_failures(error: BaseException | None) -> list[str]:
    """Every rank's failure (`rank N: ...`), on every rank."""
    mine = None if error is None else f"rank {rank()}: {type(error).__name__}: {error}"
    return [g for g in _gathered(mine) if g]
