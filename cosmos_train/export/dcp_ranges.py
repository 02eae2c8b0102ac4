"""Where each tensor's bytes lie in a DCP checkpoint's shard files, for a file-to-file copy.

DCP stores every chunk of a tensor as a small `torch.save` zip inside a shard
file, at `(offset, length)` given by `.metadata`; the chunk's raw bytes are that
zip's `data/0` record, stored (not compressed) with its CRC32 in the zip's
central directory. FSDP2 shards on dim 0, so a full tensor is its chunks' bytes
back to back. `plan_tensor_bytes` turns that into, per tensor, the list of
`ChunkBytes(file, offset, length, offset in the tensor, crc32)`.

Anything unusual makes a tensor "not plannable" (None), and the caller reads it
the ordinary way through `dcp.load`: chunks split on another dim, gaps or
overlaps, DCP storage transforms (compression), or a chunk whose pickle is not
exactly what `torch.save` writes for a contiguous tensor of the chunk's dtype and
shape (so a strided or offset storage is never copied as if it were plain).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cosmos_train.export.dcp_chunk import read_layout


@dataclass(frozen=True)
class ChunkBytes:
    """One chunk: `length` raw bytes at `offset` in shard `file`, landing at `dst_offset` in the tensor."""

    file: str  # relative to the DCP dir
    offset: int
    length: int
    dst_offset: int
    crc32: int | None  # from the chunk's zip record; None when the writer stored none


def plan_tensor_bytes(path: str | Path, metadata, keys: list[str]) -> dict[str, list[ChunkBytes] | None]:
    """For each key of `keys`, its chunks' byte locations in tensor order, or None if not plannable."""
    path = Path(path)
    by_fqn: dict[str, dict[tuple[int, ...], object]] = {}
    for idx, info in (metadata.storage_data or {}).items():
        if idx.offset is not None:
            by_fqn.setdefault(idx.fqn, {})[tuple(idx.offset)] = info
    fds: dict[str, int] = {}
    out: dict[str, list[ChunkBytes] | None] = {}
    try:
        for key in keys:
            out[key] = _plan_one(path, metadata.state_dict_metadata[key], by_fqn.get(key, {}), fds)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _plan_one(path: Path, md, infos: dict, fds: dict[str, int]) -> list[ChunkBytes] | None:
    dtype, shape = md.properties.dtype, tuple(md.size)
    row = dtype.itemsize
    for s in shape[1:]:
        row *= s
    total = row * (shape[0] if shape else 1)
    chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
    pieces: list[ChunkBytes] = []
    end = 0
    for c in chunks:
        offs, sizes = tuple(c.offsets), tuple(c.sizes)
        if offs[1:] != (0,) * len(offs[1:]) or sizes[1:] != shape[1:]:
            return None  # not a dim-0 slab: its rows are not contiguous in the full tensor
        dst = offs[0] * row if shape else 0
        if dst != end:
            return None  # a gap or an overlap
        info = infos.get(offs)
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        fd = fds.get(info.relative_path)
        if fd is None:
            fd = fds[info.relative_path] = os.open(path / info.relative_path, os.O_RDONLY)
        found = read_layout(fd, info.offset, info.length, dtype, sizes)
        if found is None:
            return None
        start, n, crc = found.data_start, found.nbytes, found.crc32
        expect = row * (sizes[0] if shape else 1)
        if n != expect:
            return None
        pieces.append(ChunkBytes(info.relative_path, start, n, dst, crc))
        end = dst + n
    return pieces if end == total else None
