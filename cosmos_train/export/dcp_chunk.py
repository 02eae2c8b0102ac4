"""Where the raw bytes of one DCP chunk lie, read from the chunk's two ends without unpickling anything.

DCP stores every chunk of a tensor as a small `torch.save` zip inside a shard
file. For a plain contiguous tensor that zip is: `data.pkl` (a fixed pickle
naming one storage), a few tiny records (`byteorder`, versions), the `data/0`
record holding the tensor's raw bytes (stored, not compressed), and the central
directory. `read_layout` reads the last few KiB (central directory: names,
sizes, CRC32s, offsets) and the first few hundred bytes (the pickle and
`data/0`'s local header), checks that the pickle is exactly what `torch.save`
writes for a contiguous tensor of the chunk's dtype and shape, little-endian,
and says where the raw bytes are. Callers copy those bytes file to file
(consolidation) or read them straight into the destination tensor (loading).
Anything unexpected (another pickle, compression, zip64 offsets, more than one
storage) returns None: the caller then reads the chunk the ordinary way.

The bytes before and after the data are returned too, so a reader can CRC the
whole chunk (the manifest's per-file CRC32) while reading the data only once.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

from cosmos_train.crc32 import combine, crc32
from cosmos_train.errors import CorruptCheckpointError
from cosmos_train.export.pread import preadv_all
from cosmos_train.export.pt_io import _PICKLE_PROTOCOL, _StorageStub, _StubPickler, _TensorStub

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_CD = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes + name + extra + comment
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes + name + extra
_EOCD_SIG, _CD_SIG, _LOCAL_SIG = 0x06054B50, 0x02014B50, 0x04034B50
TAIL_BYTES = 4096  # the central directory of a one-tensor torch.save zip is ~500 bytes
_MAX_GAP = 1 << 20  # bytes after the data beyond which a chunk is not "plain"


@dataclass(frozen=True)
class ChunkLayout:
    """One chunk's raw tensor bytes: `nbytes` at absolute `data_start` of the shard file."""

    data_start: int
    nbytes: int
    crc32: int | None  # of the data, from the zip; None when the writer stored none
    head: bytes  # the chunk's bytes before the data
    tail: bytes  # the chunk's bytes after the data


@functools.lru_cache(maxsize=256)
def expected_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """`data.pkl` that `torch.save(t)` writes for a contiguous tensor `t` with its own exact storage."""
    numel = math.prod(shape)
    buf = io.BytesIO()
    _StubPickler(buf, protocol=_PICKLE_PROTOCOL).dump(
        _TensorStub(_StorageStub("0", dtype, numel, numel * dtype.itemsize), shape))
    return buf.getvalue()


def _pread(fd: int, n: int, offset: int) -> bytes | None:
    data = os.pread(fd, n, offset)
    return data if len(data) == n else None


def _central_directory(tail: bytes, tail_start: int) -> dict[str, tuple] | None:
    """name -> (method, crc, size, local header offset), all relative to the chunk; None if unusual."""
    sig, _, _, n_here, n_total, cd_size, cd_off, comment = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
    if sig != _EOCD_SIG or comment or n_here != n_total or 0xFFFFFFFF in (cd_off, cd_size) or n_here == 0xFFFF:
        return None
    pos = cd_off - tail_start
    if pos < 0 or pos + cd_size > len(tail) - _EOCD.size:
        return None  # zip64 end records may sit between the directory and the EOCD; nothing else
    out = {}
    for _ in range(n_total):
        if pos + _CD.size > len(tail):
            return None
        f = _CD.unpack_from(tail, pos)
        if f[0] != _CD_SIG:
            return None
        name_len, extra_len, comment_len = f[10], f[11], f[12]
        name = tail[pos + _CD.size:pos + _CD.size + name_len].decode("utf-8", "replace")
        csize, usize, lho = f[8], f[9], f[16]
        if 0xFFFFFFFF in (csize, usize, lho) or csize != usize:
            return None
        out[name] = (f[4], f[7], csize, lho)
        pos += _CD.size + name_len + extra_len + comment_len
    return out


def _record(head: bytes, lho: int, size: int) -> tuple[int, bytes] | None:
    """(data offset, data) of the record whose local header is at `lho`, if `head` holds all of it."""
    if lho + _LOCAL.size > len(head):
        return None
    f = _LOCAL.unpack_from(head, lho)
    if f[0] != _LOCAL_SIG:
        return None
    start = lho + _LOCAL.size + f[9] + f[10]
    return start, head[start:start + size]


def _parse(head: bytes, cd: dict[str, tuple], length: int, dtype: torch.dtype,
           shape: tuple[int, ...]) -> tuple[int, int, int | None] | None:
    """`(data start in the chunk, nbytes, stored crc32)` from the chunk's first bytes `head` and its
    central directory `cd` (`_central_directory`), or None if the chunk is not a plain tensor."""
    if sys.byteorder != "little":
        return None
    pkl = [k for k in cd if k.endswith("/data.pkl")]
    data = [k for k in cd if "/data/" in k]
    if len(pkl) != 1 or len(data) != 1 or not data[0].endswith("/data/0"):
        return None  # more than one storage: not a lone contiguous tensor
    method, crc, nbytes, lho = cd[data[0]]
    if method != 0 or cd[pkl[0]][0] != 0 or nbytes != math.prod(shape) * dtype.itemsize:
        return None
    rec = _record(head, lho, 0)
    if rec is None or rec[0] + nbytes > length or rec[0] > len(head):
        return None
    start = rec[0]
    _, _, pkl_size, pkl_lho = cd[pkl[0]]
    pickled = _record(head[:start], pkl_lho, pkl_size)
    if pickled is None or pickled[1] != expected_pickle(dtype, tuple(shape)):
        return None
    order = [k for k in cd if k.endswith("/byteorder")]
    if order:
        found = _record(head[:start], cd[order[0]][3], cd[order[0]][2])
        if found is None or found[1] != b"little":
            return None
    # torch's writer fills in the CRC unless crc32 was turned off (then it stores 0).
    return start, nbytes, crc if (crc != 0 or nbytes == 0) else None


def read_layout(fd: int, offset: int, length: int, dtype: torch.dtype,
                shape: tuple[int, ...]) -> ChunkLayout | None:
    """Where the raw bytes of the chunk at `(offset, length)` of the open shard file `fd` lie, or None."""
    if length < _EOCD.size:
        return None
    tail_start = max(0, length - TAIL_BYTES)
    tail = _pread(fd, length - tail_start, offset + tail_start)
    if tail is None:
        return None
    cd = _central_directory(tail, tail_start)
    data = [v for k, v in (cd or {}).items() if k.endswith("/data/0")]
    if len(data) != 1:
        return None
    # Everything before the data: pickle, small records, data/0's local header (alignment padding in
    # its extra field). A little more than the offsets say, to cover that header's name and extra.
    head = _pread(fd, min(data[0][3] + _LOCAL.size + 512, length), offset)
    found = None if head is None else _parse(head, cd, length, dtype, shape)
    if found is None:
        return None
    start, nbytes, crc = found
    end = start + nbytes
    if end < tail_start:  # bytes between the data and the tail buffer
        if tail_start - end > _MAX_GAP:
            return None
        gap = _pread(fd, tail_start - end, offset + end)
        if gap is None:
            return None
        after = gap + tail
    else:
        after = tail[end - tail_start:]
    return ChunkLayout(offset + start, nbytes, crc, head[:start], after)


def _dest(target: torch.Tensor, stored: torch.dtype | None) -> tuple[torch.Tensor, memoryview]:
    """Where the bytes go: `target` itself, or (`stored` given) a CPU tensor of that dtype to copy from."""
    dest = target if stored is None else torch.empty(tuple(target.shape), dtype=stored)
    return dest, memoryview(dest.reshape(-1).view(torch.uint8).numpy()) if dest.numel() else memoryview(b"")


def read_chunk_into(fd: int, path, info, fqn: str, target: torch.Tensor, hints: dict | None = None,
                    stored: torch.dtype | None = None) -> int | None:
    """Read the plain chunk `info` (offset, length) of shard `fd` straight into `target`; its whole CRC32.

    `target` is a contiguous CPU tensor of the chunk's dtype and shape, or (`stored` = the chunk's
    dtype) any tensor of its shape: then the bytes go through a CPU tensor and are copied over (a
    GPU or other-dtype destination). Returns the CRC32 of the whole chunk (head + data + tail, as
    the manifest's per-file CRC needs), or None when the chunk is not plain (then `target` may hold
    garbage and must be filled by the caller). A short read or a data CRC that differs from the one
    stored with the chunk is a CorruptCheckpointError naming the file and tensor.

    `hints` (shared by the calls of one load) remembers where the data starts in chunks
    of each dtype/shape/length (torch.save lays them out the same way): a chunk with a
    known layout is read in one `preadv` (head, data into `target`, tail), then checked.
    """
    dest, view = _dest(target, stored)
    hints = {} if hints is None else hints
    key = (dest.dtype, tuple(dest.shape), info.length)
    found = None
    start = hints.get(key)
    if start is not None and 0 <= start and start + len(view) + _EOCD.size <= info.length:
        head, after = bytearray(start), bytearray(info.length - start - len(view))
        if preadv_all(fd, [memoryview(head), view, memoryview(after)], info.offset) == info.length:
            cd = _central_directory(after, start + len(view))
            found = None if cd is None else _parse(head, cd, info.length, dest.dtype, tuple(dest.shape))
            if found is not None and (found[0], found[1]) != (start, len(view)):
                found = None
    if found is not None:
        stored_crc = found[2]
    else:  # first chunk of its kind, or not laid out as guessed: locate, then read the data
        lay = read_layout(fd, info.offset, info.length, dest.dtype, tuple(dest.shape))
        if lay is None:
            return None
        hints[key] = lay.data_start - info.offset
        head, after, stored_crc = lay.head, lay.tail, lay.crc32
        if preadv_all(fd, [view], lay.data_start) != len(view):
            raise CorruptCheckpointError(f"{path}: truncated ({fqn!r} needs bytes {info.offset}.."
                                         f"{info.offset + info.length})")
    data_crc = crc32(view)
    if stored_crc is not None and data_crc != stored_crc:
        raise CorruptCheckpointError(f"{path}: crc32 mismatch in tensor {fqn!r} (bytes "
                                     f"{info.offset + len(head)}..{info.offset + len(head) + len(view)}, against the "
                                     f"CRC32 stored with the chunk): the file changed since the save")
    if dest is not target:
        target.copy_(dest)
    return crc32(after, combine(crc32(head), data_crc, len(view)))


def read_rows_into(fd: int, path, info, fqn: str, target: torch.Tensor, chunk_shape: tuple[int, ...], row0: int,
                   stored: torch.dtype | None = None) -> tuple[int, int, int] | None:
    """Read rows `[row0, row0 + len(target))` of the plain chunk `info` into `target` (a resharded load).

    `chunk_shape` is the stored chunk's shape; `stored` its dtype when `target` cannot take the
    bytes directly (another dtype or device: read into a CPU tensor, then copied). Returns
    `(absolute offset, length, crc32)` of the bytes read (only part of the chunk: the zip's own
    CRC cannot be checked, the manifest's per-file CRC still is), or None if the chunk is not plain.
    """
    dest, view = _dest(target, stored)
    lay = read_layout(fd, info.offset, info.length, dest.dtype, tuple(chunk_shape))
    if lay is None:
        return None
    row_bytes = lay.nbytes // chunk_shape[0] if chunk_shape[0] else 0
    start = lay.data_start + row0 * row_bytes
    if start + len(view) > lay.data_start + lay.nbytes:
        raise AssertionError(f"{fqn}: rows past the chunk's end")  # a planning bug, not a damaged file
    if preadv_all(fd, [view], start) != len(view):
        raise CorruptCheckpointError(f"{path}: truncated ({fqn!r} needs bytes {start}..{start + len(view)})")
    crc = crc32(view)
    if dest is not target:
        target.copy_(dest)
    return start, len(view), crc
