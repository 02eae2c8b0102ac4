"""Consolidation as a byte-range copy: lay out the output files first, then copy every tensor into place.

Every output tensor's dtype and shape is known from the DCP metadata, so the
whole output layout is too: the `.safetensors` header (then each tensor at its
data offset), or for `.pt` the zip that torch's own writer lays out when told
each record's size (`write_record_metadata`, as `torch.serialization.skip_data`
does): the same records, names, alignment and sizes as `torch.save`, with the
data left as holes. `dcp_ranges` says where each tensor's bytes lie in the shard
files; `range_copy.copy_ranges` copies them straight to their offsets, file to
file (no dtype change) or through a small buffer (dtype change, or to checksum
every byte). Tensors that are not plain dim-0 chunks are read through `dcp.load`
and written at their offsets the same way. One fsync per output file at the end.

A `.pt` record's CRC32 (in its data descriptor and in the central directory)
is then patched in: the CRC32 of a concatenation follows from the CRC32s of its
parts (`crc32_combine`), and each DCP chunk's CRC32 is already stored in the
chunk's own zip record, so a plain copy needs no pass over the bytes in Python.
The result loads like, and has the same record bytes as, the streaming writer's.

With `verify_source=True` every chunk is read in user space instead and its
CRC32, computed on the way, is checked against the one DCP stored with it: a
corrupt shard fails with the file and tensor named, without a second read.
"""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosmos_train.export.dcp_source import DcpSource, group_by_bytes
from cosmos_train.export.tensor_source import TensorEntry
from cosmos_train.errors import CheckpointError, CorruptCheckpointError, CosmosTrainError
from cosmos_train.export.dcp_ranges import ChunkBytes, plan_tensor_bytes
from cosmos_train.crc32 import combine as crc32_combine, crc32
from cosmos_train.export.range_copy import Range, copy_ranges

THREADS = 4  # I/O threads: enough to keep a read and a write in flight on each side
_GROUP_BYTES = 64 << 20  # tensors read through dcp.load (the rare non-plain ones), per call
_CD_SIG, _DESCRIPTOR_SIG = 0x02014B50, 0x08074B50


@dataclass(frozen=True)
class CopyItem:
    """One output tensor copied from one DCP key (dtype cast when `out.dtype` differs)."""

    out: TensorEntry
    source: str


@dataclass
class _OutFile:
    tmp: Path
    final: Path
    entries: list[TensorEntry]
    offsets: dict[str, int] = field(default_factory=dict)  # key -> byte offset of its data
    crc_slots: dict[str, tuple[int, int]] = field(default_factory=dict)  # .pt: key -> (descriptor, CD) crc pos

    @property
    def is_pt(self) -> bool:
        return not self.tmp.name.endswith(".safetensors")


@dataclass
class CopyExportStats:
    """How the bytes went: through the kernel, through a buffer, or via dcp.load."""

    kernel_bytes: int = 0
    buffered_bytes: int = 0
    loaded_bytes: int = 0
    fallback_reason: str | None = None
    # With verify_source: per shard file (relative to the DCP dir), the `[start, end, crc32]` runs
    # read, so a whole-file check against MANIFEST.json only has to read the bytes in between.
    segments: dict[str, list[list[int]]] = field(default_factory=dict)


# -------------------------------------------------------------------------------------- layouts
def _layout_safetensors(f: _OutFile, metadata: dict[str, str] | None) -> None:
    from cosmos_train.export.safetensors_io import _header_bytes

    header = _header_bytes(f.entries, metadata)
    off = len(header)
    for e in f.entries:
        f.offsets[e.name] = off
        off += e.nbytes
    with open(f.tmp, "wb") as fh:
        fh.write(header)
        fh.truncate(off)


def _layout_pt(f: _OutFile) -> None:
    from cosmos_train.export.pt_io import PtWriter

    w = PtWriter(f.tmp, [(e.name, e.dtype, e.shape) for e in f.entries])
    w.reserve_rest()  # same records as PtWriter.write, the data left as holes to copy into
    w.close()
    with zipfile.ZipFile(f.tmp) as z, open(f.tmp, "rb") as fh:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        cd_pos = {}
        fh.seek(z.start_dir)
        cd = fh.read()
        pos = 0
        while pos + 46 <= len(cd) and struct.unpack_from("<I", cd, pos)[0] == _CD_SIG:
            n, m, k = struct.unpack_from("<HHH", cd, pos + 28)
            name = cd[pos + 46:pos + 46 + n].decode().split("/", 1)[1]
            cd_pos[name] = z.start_dir + pos + 16
            pos += 46 + n + m + k
        for i, e in enumerate(f.entries):
            info = infos[f"data/{i}"]
            fh.seek(info.header_offset + 26)
            n, m = struct.unpack("<HH", fh.read(4))
            start = info.header_offset + 30 + n + m
            f.offsets[e.name] = start
            if e.nbytes == 0:
                continue  # an empty record has CRC32 0 and no data descriptor: nothing to patch
            fh.seek(start + e.nbytes)
            if struct.unpack("<I", fh.read(4))[0] != _DESCRIPTOR_SIG or f"data/{i}" not in cd_pos:
                raise RuntimeError(f"{f.tmp}: unexpected zip layout from torch's writer (record data/{i})")
            f.crc_slots[e.name] = (start + e.nbytes + 4, cd_pos[f"data/{i}"])


def _out_files(tmp: Path, out: Path, entries: list[TensorEntry], max_shard_size,
               st_metadata: dict[str, str] | None) -> tuple[list[_OutFile], list]:
    """Output files (laid out on disk, data still holes) and the `(temp, final)` moves."""
    from cosmos_train.export import safetensors_io as st

    if out.name.endswith((".pt", ".pth")):
        if max_shard_size is not None:
            raise CosmosTrainError("--max-shard-size applies to .safetensors outputs only")
        files = [_OutFile(tmp / out.name, out, entries)]
        _layout_pt(files[0])
        return files, [(files[0].tmp, out)]
    if not out.name.endswith(".safetensors"):
        raise CosmosTrainError(f"{out}: unknown output type; use a .pt, .pth or .safetensors file name")
    try:
        shards = st.plan_shards(entries, st.parse_size(max_shard_size)) if max_shard_size else [entries]
        names = st.shard_file_names(out, len(shards)) if len(shards) > 1 else [out.name]
        for e in entries:
            st._st_dtype(e.dtype)
    except ValueError as e:  # a bad --max-shard-size, or a dtype safetensors cannot store
        raise CosmosTrainError(f"{out.name}: {e}") from None
    files = [_OutFile(tmp / n, out.parent / n, s) for s, n in zip(shards, names, strict=True)]
    for f in files:
        _layout_safetensors(f, st_metadata)
    moves = [(f.tmp, f.final) for f in files]
    if len(shards) > 1:
        st.write_index(tmp / st.index_file_name(out), shards, names)
        moves.append((tmp / st.index_file_name(out), out.parent / st.index_file_name(out)))
    return files, moves


# ----------------------------------------------------------------------------------------- copy
def export(reader: DcpSource, items: list[CopyItem], tmp: Path, out: Path, *,
           max_shard_size=None, verify_source: bool = False, mode: str = "auto", threads: int = THREADS,
           progress: Callable[[int], None] | None = None, st_metadata: dict[str, str] | None = None,
           stats: CopyExportStats | None = None) -> list[tuple[Path, Path]]:
    """Write `items` to `out` (its files created under `tmp`); returns the `(temp, final)` moves.

    `st_metadata` is the `__metadata__` of `.safetensors` outputs (default `{"format": "pt"}`).

    Raises CheckpointError naming the shard file when a source cannot be read or
    (with `verify_source`) a chunk's bytes do not match the CRC32 DCP stored.
    """
    stats = stats if stats is not None else CopyExportStats()
    files, moves = _out_files(tmp, out, [it.out for it in items], max_shard_size,
                              {"format": "pt"} if st_metadata is None else st_metadata)
    src_of = {it.out.name: it.source for it in items}
    plan = plan_tensor_bytes(reader.path, reader.metadata, [it.source for it in items])
    for f in files:
        fd = os.open(f.tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            _fill(reader, f, fd, plan, src_of, verify_source=verify_source, mode=mode, threads=threads,
                  progress=progress, stats=stats)
            os.fsync(fd)  # once per file, after all its bytes
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _disk_full(f, out) from None
            raise
        finally:
            os.close(fd)
    return moves


def _fill(reader: DcpSource, f: _OutFile, fd: int, plan: dict, src_of: dict[str, str], *,
          verify_source: bool, mode: str, threads: int, progress, stats: CopyExportStats) -> None:
    """Copy (or load and write) every tensor of one output file into place; patch `.pt` CRC32s."""
    sources = sorted({c.file for e in f.entries for c in (plan[src_of[e.name]] or [])})
    src_index = {name: i for i, name in enumerate(sources)}
    ranges: list[Range] = []
    owners: list[tuple[str, ChunkBytes]] = []
    slow: list[TensorEntry] = []
    for e in f.entries:
        chunks = plan[src_of[e.name]]
        if chunks is None:
            slow.append(e)
            continue
        src_dtype = reader.entries[src_of[e.name]].dtype
        convert = None if src_dtype == e.dtype else (src_dtype, e.dtype)
        for c in chunks:
            dst = c.dst_offset if convert is None else c.dst_offset // src_dtype.itemsize * e.dtype.itemsize
            ranges.append(Range(src_index[c.file], c.offset, c.length, f.offsets[e.name] + dst, convert))
            owners.append((e.name, c))
    # A .pt needs each record's CRC32: from DCP's stored chunk CRCs, else computed on the way.
    need_crc = verify_source or (f.is_pt and any(c.crc32 is None for _, c in owners))
    if need_crc and mode == "kernel":
        mode = "buffered"  # a CRC needs the bytes in user space, whatever the copy mode asked
    try:
        cs = copy_ranges([reader.path / s for s in sources], fd, ranges, mode=mode, checksum=need_crc,
                         out_checksum=f.is_pt, threads=threads, progress=progress)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise CheckpointError(f"failed to copy tensor data: {e} (unreadable shard file?)") from e
    except EOFError as e:
        raise CheckpointError(f"failed to copy tensor data: {e} (truncated shard file?)") from e
    stats.kernel_bytes += cs.kernel_bytes
    stats.buffered_bytes += cs.buffered_bytes
    stats.fallback_reason = stats.fallback_reason or cs.fallback_reason
    if verify_source:
        for (key, c), crc in zip(owners, cs.crcs, strict=True):
            stats.segments.setdefault(c.file, []).append([c.offset, c.offset + c.length, crc])
            if c.crc32 is not None and crc != c.crc32:
                raise CorruptCheckpointError(f"{reader.path / c.file}: the bytes of {src_of[key]!r} at "
                                             f"offset {c.offset} fail their CRC32 check (corrupt shard file)")
    record_crcs = _record_crcs(f, owners, ranges, cs.out_crcs) if f.is_pt else {}
    record_crcs |= _write_loaded(reader, f, fd, slow, src_of, progress, stats)
    for key, crc in record_crcs.items():
        if key in f.crc_slots:  # an empty record has none
            desc, cd = f.crc_slots[key]
            os.pwrite(fd, struct.pack("<I", crc), desc)
            os.pwrite(fd, struct.pack("<I", crc), cd)


def _disk_full(f: _OutFile, out: Path) -> CosmosTrainError:
    need = f.tmp.stat().st_size if f.tmp.exists() else 0
    return CosmosTrainError(f"{out}: no space left on the device while writing {f.final.name} "
                            f"({need / 1e9:.2f} GB); free some space or choose another output path")


def _record_crcs(f: _OutFile, owners, ranges: list[Range], out_crcs) -> dict[str, int]:
    """CRC32 of each copied `.pt` record, joined from its chunks' CRC32s in order."""
    crcs: dict[str, int] = {e.name: 0 for e in f.entries}
    for (key, c), r, oc in zip(owners, ranges, out_crcs, strict=True):
        crc = oc if oc is not None else c.crc32
        if crc is None:  # cannot happen: checksum=True is forced when a chunk has no stored CRC
            raise AssertionError(f"no CRC32 for a chunk of {key}")
        crcs[key] = crc32_combine(crcs[key], crc, r.out_length)
    return crcs


def _write_loaded(reader: DcpSource, f: _OutFile, fd: int, entries: list[TensorEntry], src_of,
                  progress, stats: CopyExportStats) -> dict[str, int]:
    """Read the non-plain tensors through dcp.load and write them at their offsets; their CRC32s."""
    crcs = {}
    for group in group_by_bytes(entries, _GROUP_BYTES):
        loaded = reader.load([src_of[e.name] for e in group])
        for e in group:
            t = loaded.pop(src_of[e.name])
            t = (t if t.dtype == e.dtype else t.to(e.dtype)).contiguous().reshape(-1)
            view = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], f.offsets[e.name] + done)
            crcs[e.name] = crc32(view)
            stats.loaded_bytes += len(view)
            if progress is not None:
                progress(len(view))
    return crcs if f.is_pt else {}
