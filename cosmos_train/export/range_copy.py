"""Copy byte ranges between files at disk speed: a plan of `(source, offset, length) -> destination offset`.

Consolidation with no dtype change is a file-to-file copy: FSDP2 writes every
tensor as dim-0 chunks, and each chunk's bytes sit contiguously in a shard file,
already in the byte order the output needs. `copy_ranges` copies such a plan
into one open output file, at explicit offsets, so the copies can run on a small
thread pool (the GIL is released in every call below) in any order:

  "kernel"    `os.copy_file_range`: the bytes never enter this process (flat
              RSS, no memcpy); no checksum is possible on the way.
  "buffered"  `os.preadv` into a reusable per-thread buffer, `crc32` over
              it, `os.pwrite`: one read and one write per byte, and the CRC32 of
              every range computed in the same pass (no second read to verify).
  "auto"      kernel where the file systems allow it, buffered where they refuse
              (EXDEV/EOPNOTSUPP/ENOSYS/EINVAL...), and buffered whenever a CRC is
              asked for.

A range may also convert its dtype (`convert=(src, dst)`): then it is buffered,
and `length` counts source bytes. Ranges larger than `piece_bytes` are split so
the pool overlaps reads and writes within one big tensor too; CRCs of the pieces
are joined with `crc32.combine`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cosmos_train.crc32 import combine as crc32_combine, crc32
from cosmos_train.export.pread import preadv_all
from cosmos_train.write_behind import WriteBehind

MODES = ("auto", "kernel", "buffered")
PIECE_BYTES = 8 << 20
# copy_file_range failures that mean "not here" (cross-device on old kernels, FUSE, some
# network file systems), not a broken file: fall back to the buffered copy.
_UNSUPPORTED = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ETXTBSY,
                errno.EPERM}


@dataclass(frozen=True)
class Range:
    """Copy `length` bytes of source file `src` (an index into the sources) at `src_offset` to `dst_offset`.

    With `convert=(src_dtype, dst_dtype)` (torch dtypes) the bytes are read as
    `src_dtype`, cast, and `length * dst.itemsize / src.itemsize` bytes written.
    """

    src: int
    src_offset: int
    length: int
    dst_offset: int
    convert: tuple | None = None

    @property
    def out_length(self) -> int:
        """Bytes written to the destination."""
        if self.convert is None:
            return self.length
        s, d = self.convert
        return self.length // s.itemsize * d.itemsize


@dataclass
class CopyStats:
    """What `copy_ranges` did: bytes read and written, and per-range CRC32s when asked."""

    bytes_read: int = 0
    bytes_written: int = 0
    kernel_bytes: int = 0
    buffered_bytes: int = 0
    # Per range, in plan order: CRC32 of its source bytes (when checksum=True) and of the bytes
    # written (also for every converted range); None where a range went through the kernel.
    crcs: list[int | None] = field(default_factory=list)
    out_crcs: list[int | None] = field(default_factory=list)
    fallback_reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _add(self, read: int, written: int, kernel: bool) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            if kernel:
                self.kernel_bytes += read
            else:
                self.buffered_bytes += read


# ------------------------------------------------------------------------------------ copying
@dataclass(frozen=True)
class _Piece:
    index: int  # the range it belongs to
    part: int  # its position within that range
    src: int
    src_offset: int
    length: int
    dst_offset: int
    convert: tuple | None


def _pieces(ranges: Sequence[Range], piece_bytes: int) -> list[_Piece]:
    out = []
    for i, r in enumerate(ranges):
        step = piece_bytes
        if r.convert is not None:  # whole elements per piece
            step = max(r.convert[0].itemsize, piece_bytes // r.convert[0].itemsize * r.convert[0].itemsize)
        off, part = 0, 0
        while off < r.length or (r.length == 0 and part == 0):
            n = min(step, r.length - off)
            dst = r.dst_offset + (off if r.convert is None else off // r.convert[0].itemsize * r.convert[1].itemsize)
            out.append(_Piece(i, part, r.src, r.src_offset + off, n, dst, r.convert))
            off += n
            part += 1
            if r.length == 0:
                break
    return out


class _Unsupported(Exception):
    """copy_file_range refused for this pair of files."""


def _kernel_copy(src_fd: int, dst_fd: int, p: _Piece) -> None:
    done = 0
    while done < p.length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, p.length - done, p.src_offset + done, p.dst_offset + done)
        except OSError as e:
            if e.errno in _UNSUPPORTED and done == 0:
                raise _Unsupported(os.strerror(e.errno)) from None
            raise
        if n == 0:
            if os.fstat(src_fd).st_size < p.src_offset + p.length:
                raise EOFError(f"source ended {p.length - done} bytes early (at offset {p.src_offset + done})")
            raise _Unsupported("copy_file_range copied nothing")  # some file systems return 0 instead of failing
        done += n


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    done = preadv_all(fd, [view], offset)
    if done < len(view):
        raise EOFError(f"source ended {len(view) - done} bytes early (at offset {offset + done})")


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _buffered_copy(src_fd: int, dst_fd: int, p: _Piece, bufs, want_crc: bool,
                   want_out_crc: bool = True) -> tuple[int | None, int | None]:
    """Read, checksum, (convert,) write one piece: `(crc32 of the source bytes, crc32 of the written bytes)`.

    `bufs` is this thread's `_Buffers`: the piece is read into, and converted into, buffers that
    live as long as the thread, so a long export allocates nothing per piece (no heap creep).
    """
    view = bufs.get("src", p.length)
    _read_exact(src_fd, view, p.src_offset)
    crc = crc32(view) if want_crc else None
    if p.convert is None:
        _write_all(dst_fd, view, p.dst_offset)
        return crc, crc
    import torch

    src_dtype, dst_dtype = p.convert
    n = p.length // src_dtype.itemsize
    out = bufs.get("dst", n * dst_dtype.itemsize)
    if n:
        torch.frombuffer(out, dtype=dst_dtype).copy_(torch.frombuffer(view, dtype=src_dtype))
    _write_all(dst_fd, out, p.dst_offset)
    return crc, crc32(out) if want_out_crc else None  # a converted range has no stored CRC to fall back on


class _Buffers:
    """Per-thread reusable byte buffers, grown on demand, handed out as exact-length views."""

    def __init__(self, min_bytes: int):
        self._min, self._bufs = min_bytes, {}

    def get(self, name: str, n: int) -> memoryview:
        buf = self._bufs.get(name)
        if buf is None or len(buf) < n:
            buf = self._bufs[name] = bytearray(max(n, self._min))
        return memoryview(buf)[:n]


def copy_ranges(sources: Sequence[str | Path], dst_fd: int, ranges: Sequence[Range], *, mode: str = "auto",
                checksum: bool = False, out_checksum: bool = True, threads: int = 2,
                piece_bytes: int = PIECE_BYTES,
                progress: Callable[[int], None] | None = None) -> CopyStats:
    """Copy every range of `ranges` from `sources[r.src]` into the open file `dst_fd`.

    The destination is written at explicit offsets only (its file position is
    untouched) and is not fsynced: the caller fsyncs once when the file is done.
    `checksum=True` returns each range's CRC32 in `stats.crcs` (source bytes) and
    `stats.out_crcs` (written bytes), computed as the bytes pass (buffered); a converted range's
    written bytes are checksummed unless `out_checksum=False` (nothing needs them, e.g. safetensors).
    `progress(n)` is called (from the copy threads) with the bytes written by each piece.
    The writeback of every piece starts as soon as it is written (`WriteBehind`).
    Raises OSError/EOFError naming the source file on a read failure.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if checksum and mode == "kernel":
        raise ValueError("checksum needs the bytes in user space: use mode 'buffered' or 'auto'")
    stats = CopyStats()
    pieces = _pieces(ranges, piece_bytes)
    part_crcs: dict[tuple[int, int], tuple[int, int]] = {}
    fds: list[int] = []
    try:
        for s in sources:
            fd = os.open(s, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fds.append(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        use_kernel = [mode == "kernel" or (mode == "auto" and not checksum)]
        local = threading.local()
        behind = WriteBehind(dst_fd)

        def run(p: _Piece) -> None:
            try:
                if use_kernel[0] and p.convert is None:
                    try:
                        _kernel_copy(fds[p.src], dst_fd, p)
                        stats._add(p.length, p.length, kernel=True)
                        behind.written(p.dst_offset, p.length)
                        if progress is not None:
                            progress(p.length)
                        return
                    except _Unsupported as e:
                        if mode == "kernel":
                            raise OSError(errno.EOPNOTSUPP, f"copy_file_range unavailable: {e}") from None
                        use_kernel[0] = False  # the rest goes buffered too
                        stats.fallback_reason = str(e)
                bufs = getattr(local, "bufs", None)
                if bufs is None:
                    bufs = local.bufs = _Buffers(min(piece_bytes, 1 << 20))
                part_crcs[(p.index, p.part)] = _buffered_copy(fds[p.src], dst_fd, p, bufs, checksum,
                                                              out_checksum)
                stats._add(p.length, _out_len(p), kernel=False)
                behind.written(p.dst_offset, _out_len(p))
                if progress is not None:
                    progress(_out_len(p))
            except EOFError as e:
                raise EOFError(f"{sources[p.src]}: {e}") from e
            except OSError as e:  # keep errno: the caller tells a full disk from a bad source
                raise OSError(e.errno, f"{sources[p.src]} -> output: {e.strerror or e}") from e

        if threads <= 1:
            for p in pieces:
                run(p)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="range-copy") as pool:
                futures = [pool.submit(run, p) for p in pieces]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()  # stop at the first failure instead of copying the rest
                    raise
    finally:
        for fd in fds:
            os.close(fd)
    stats.crcs, stats.out_crcs = [None] * len(ranges), [None] * len(ranges)
    for p in pieces:  # in order: join the pieces of each range
        c, oc = part_crcs.get((p.index, p.part), (None, None))
        if p.part == 0:
            stats.crcs[p.index], stats.out_crcs[p.index] = c, oc
            continue
        prev, prev_out = stats.crcs[p.index], stats.out_crcs[p.index]
        stats.crcs[p.index] = None if c is None or prev is None else crc32_combine(prev, c, p.length)
        stats.out_crcs[p.index] = None if oc is None or prev_out is None else crc32_combine(prev_out, oc, _out_len(p))
    return stats


def _out_len(p: _Piece) -> int:
    return p.length if p.convert is None else p.length // p.convert[0].itemsize * p.convert[1].itemsize
