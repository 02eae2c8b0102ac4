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

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cosmos_train.export.pt_io import _PICKLE_PROTOCOL, _StorageStub, _StubPickler, _TensorStub

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_SIG = 0x04034B50


@dataclass(frozen=True)
class ChunkBytes:
    """One chunk: `length` raw bytes at `offset` in shard `file`, landing at `dst_offset` in the tensor."""

    file: str  # relative to the DCP dir
    offset: int
    length: int
    dst_offset: int
    crc32: int | None  # from the chunk's zip record; None when the writer stored none


class _SliceFile(io.RawIOBase):
    """A read-only, seekable window `[start, start + length)` of an open file, for `zipfile`."""

    def __init__(self, fd: int, start: int, length: int):
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _expected_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """`data.pkl` that `torch.save(t)` writes for a contiguous tensor `t` with its own exact storage."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    buf = io.BytesIO()
    _StubPickler(buf, protocol=_PICKLE_PROTOCOL).dump(_TensorStub(_StorageStub("0", dtype, numel, nbytes), shape))
    return buf.getvalue()


def _chunk_payload(fd: int, offset: int, length: int, dtype: torch.dtype,
                   shape: tuple[int, ...]) -> tuple[int, int, int | None] | None:
    """`(absolute offset, length, crc32)` of the raw bytes in one DCP chunk, or None if it is not plain."""
    try:
        z = zipfile.ZipFile(_SliceFile(fd, offset, length))
        infos = z.infolist()
        data = [i for i in infos if i.filename.endswith("/data/0")]
        pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
        if len(data) != 1 or len(pkl) != 1 or any(i.filename.count("/data/") != 1
                                                    for i in infos if "/data/" in i.filename):
            return None  # more than one storage: not a lone contiguous tensor
        d = data[0]
        if d.compress_type != zipfile.ZIP_STORED or z.read(pkl[0]) != _expected_pickle(dtype, shape):
            return None
        head = os.pread(fd, _LOCAL_HEADER.size, offset + d.header_offset)
        sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        if sig != _LOCAL_SIG:
            return None
        start = d.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + d.file_size > length:
            return None
        # torch's writer always fills in the CRC unless crc32 was turned off (then it stores 0).
        crc = d.CRC if (d.CRC != 0 or d.file_size == 0) else None
        return offset + start, d.file_size, crc
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError):
        return None


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
        found = _chunk_payload(fd, info.offset, info.length, dtype, sizes)
        if found is None:
            return None
        start, n, crc = found
        expect = row * (sizes[0] if shape else 1)
        if n != expect:
            return None
        pieces.append(ChunkBytes(info.relative_path, start, n, dst, crc))
        end = dst + n
    return pieces if end == total else None
