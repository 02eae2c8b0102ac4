"""Reading DCP checkpoints without running code from the files.

torch's `FileSystemReader.read_metadata` unpickles `.metadata` with a bare
`pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor item with
`torch.load(weights_only=False)`: a crafted checkpoint runs arbitrary code on
`inspect`, `consolidate`, `load_path` and `resume`. Every DCP read in this package
goes through `SafeReader` (metadata through an allow-list unpickler: the DCP
metadata classes, torch dtypes/sizes/layouts, paths and plain containers) and
`SafePlanner` (non-tensor items with `weights_only=True`). Both raise a
CheckpointError naming the file or key; neither suggests turning the safety off.

`SafeReader` also checksums what it reads, while reading (no second pass): every
item's bytes are read once into memory, CRC32'd, then unpickled from that buffer.
`segments` records `(start, end, crc)` runs per file; `integrity.verify_reads`
combines them (across ranks) and compares with MANIFEST.json. An item that cannot
be unpickled is a `CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from cosmos_train import layout
from cosmos_train.crc32 import combine as crc32_combine, crc32
from cosmos_train.errors import CheckpointError, CorruptCheckpointError
from cosmos_train.export.dcp_chunk import read_chunk_into, read_rows_into

METADATA_FILE = ".metadata"
ALGORITHM = "crc32"  # the manifest's checksum (checkpoint.integrity writes it)
_CHUNK = 8 << 20
READ_THREADS = 2  # plain chunks read (and CRC'd) concurrently: one thread's CRC overlaps the other's I/O
Segments = dict[str, list[list[int]]]  # file (relative to the part dir) -> [[start, end, crc32], ...]

# Exactly the globals torch's own metadata pickles reference (tests/checkpoint/test_dcp_safe.py
# checks this list against the metadata of every part the Checkpointer writes).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata`; any global outside the allow-list raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata_file(path: str | Path, *, raw: bytes | None = None) -> Metadata:
    """Parse a DCP `.metadata` file (or its bytes `raw`) safely; CheckpointError naming the file."""
    path = Path(path)
    try:
        if raw is None:
            raw = path.read_bytes()
        md = MetadataUnpickler(io.BytesIO(raw)).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing DCP metadata file") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: {e} (the file is not torch DCP metadata, or is malicious)") \
            from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
        # what a truncated or garbage pickle stream raises
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(md).__name__})")
    return md


class SafeReader(FileSystemReader):
    """A FileSystemReader that runs no code from the files and checksums what it reads.

    Metadata goes through `MetadataUnpickler` (parsed once per reader); items are read
    whole, CRC32'd into `segments`, and unpickled weights-only from memory.
    """

    def __init__(self, path: str | Path, *args, **kwargs) -> None:
        super().__init__(path, *args, **kwargs)
        self._metadata: Metadata | None = None
        self._sizes: dict | None = None
        self.segments: Segments = {}
        self.in_place_items = 0  # chunks read straight into their destination

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"{path}: missing DCP metadata file") from None
            md = read_metadata_file(path, raw=raw)
            self._record(path.name, 0, len(raw), crc32(raw))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._metadata = md
        return self._metadata

    def _record(self, rel: str, start: int, length: int, crc: int) -> None:
        """Note that bytes `[start, start + length)` of `rel` were read, with CRC32 `crc`."""
        runs = self.segments.setdefault(rel, [])
        if runs and runs[-1][1] == start:  # contiguous with the last run: extend its CRC
            runs[-1][1] += length
            runs[-1][2] = crc32_combine(runs[-1][2], crc, length)
        elif not any(r[0] == start for r in runs):  # an item read twice (resharding) counts once
            runs.append([start, start + length, crc])

    def read_data(self, plan, planner) -> Future:
        """torch's FileSystemReader.read_data, reading each item once (checksummed), plain tensors in place.

        A chunk that is a plain tensor filling its whole destination (the common resume: same
        world size) is read straight into the destination tensor, or through a CPU tensor when the
        destination is on a GPU or of another dtype (`_in_place_target`); any other item is read
        into memory and unpickled weights-only.
        """
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in per_file.items():
            path = Path(self.path) / rel
            by_item: dict[Any, list] = {}
            for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):  # forward
                by_item.setdefault(req.storage_index, []).append(req)
            with open(path, "rb") as f, ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dcp-read") as pool:
                # Plain chunks are read on the pool (the GIL is released while reading and CRCing),
                # everything else here, in file order, while the pool works.
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                direct, hints, filled = {}, {}, set()
                for index, item_reqs in by_item.items():
                    dest = self._in_place_target(self.storage_data[index], item_reqs, planner)
                    if dest is not None:
                        req, target, stored, rows = dest
                        if stored is None and target.data_ptr() in filled:
                            # Another item fills the same memory (an EMA entry that is the model's own
                            # buffer): stage this one, so no thread checksums memory another one writes.
                            stored = target.dtype
                        filled.add(target.data_ptr())
                        info = self.storage_data[index]
                        if rows is not None:  # part of the chunk (resharding): rows of it
                            future = pool.submit(read_rows_into, f.fileno(), path, info, index.fqn, target, *rows,
                                                 stored)
                        else:
                            future = pool.submit(read_chunk_into, f.fileno(), path, info, index.fqn, target, hints,
                                                 stored)
                        direct[index] = ((req, target), future)
                try:
                    for index, item_reqs in by_item.items():
                        info = self.storage_data[index]
                        if index in direct:
                            (req, target), future = direct[index]
                            got = future.result()
                            if got is not None:
                                start, length, crc = got if isinstance(got, tuple) else (info.offset, info.length, got)
                                self._record(rel, start, length, crc)
                                planner.commit_tensor(req, target)
                                self.in_place_items += 1
                                continue
                        f.seek(info.offset)
                        data = f.read(info.length)
                        if len(data) != info.length:
                            raise CorruptCheckpointError(f"{path}: truncated ({index.fqn!r} needs "
                                                         f"bytes {info.offset}..{info.offset + info.length})")
                        self._record(rel, info.offset, len(data), crc32(data))
                        for req in item_reqs:
                            self._deliver(req, info, data, path, planner)
                except BaseException:
                    for _, future in direct.values():
                        future.cancel()
                    raise
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _in_place_target(self, info, reqs: list, planner):
        """`(request, destination, stored dtype or None, rows or None)` when a chunk's bytes can be read
        without unpickling, else None.

        That is: one tensor request, without a DCP storage transform, for the whole stored chunk or
        (resharding) for whole rows of it: then `rows = (chunk shape, first row)`. The dtype is None
        when the destination is a contiguous CPU tensor of the stored dtype (read straight into it);
        else (a GPU tensor, another dtype) the bytes go through a CPU tensor of the stored dtype.
        """
        if len(reqs) != 1 or reqs[0].type != LoadItemType.TENSOR or info.transform_descriptors:
            return None
        req = reqs[0]
        md = self.read_metadata().state_dict_metadata.get(req.storage_index.fqn)
        chunk = self._chunk_sizes(req.storage_index)
        sizes, offsets = tuple(req.lengths), tuple(req.storage_offsets)
        if md is None or chunk is None:
            return None
        rows = None
        if any(offsets) or sizes != chunk:  # resharding: only part of the chunk is wanted
            if not chunk or any(offsets[1:]) or sizes[1:] != chunk[1:]:
                return None  # not whole rows: not one byte range
            rows = (chunk, offsets[0])
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != sizes:
            return None
        stored = md.properties.dtype
        direct = target.device.type == "cpu" and target.is_contiguous() and target.dtype == stored
        return req, target, None if direct else stored, rows

    def _chunk_sizes(self, index) -> tuple[int, ...] | None:
        """The stored size of the chunk `index` (fqn + offset) from the metadata."""
        if self._sizes is None:
            self._sizes = {}
            for fqn, md in self.read_metadata().state_dict_metadata.items():
                for c in getattr(md, "chunks", ()):
                    self._sizes[(fqn, tuple(c.offsets))] = tuple(c.sizes)
        return self._sizes.get((index.fqn, tuple(index.offset or ())))

    def _deliver(self, req, info, data: bytes, path: Path, planner) -> None:
        stream = self.transforms.transform_load_stream(req, info.transform_descriptors or (), io.BytesIO(data))
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(stream.read(-1)))
            return
        if not stream.seekable():
            stream = io.BytesIO(stream.read(-1))
        try:
            tensor = torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CorruptCheckpointError(f"{path}: tensor {req.storage_index.fqn!r} refused: not a plain "
                                         f"tensor ({weights_only_reason(e)}); the file is corrupt or malicious") \
                from None
        except (RuntimeError, EOFError, ValueError, KeyError) as e:  # torch's zip reader on damaged bytes
            raise CorruptCheckpointError(f"{path}: tensor {req.storage_index.fqn!r} cannot be read "
                                         f"({type(e).__name__}: {weights_only_reason(e)}); the file is damaged") \
                from None
        if not isinstance(tensor, torch.Tensor):
            raise CorruptCheckpointError(f"{path}: item {req.storage_index.fqn!r} is not a tensor")
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpointError(f"{path}: tensor {req.storage_index.fqn!r} has size "
                                         f"{tuple(tensor.size())}, the metadata says {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor items with `torch.load(weights_only=True)`.

    Those items are plain values (ints, floats, lists, dicts, bytes, tensors: the optimizer's
    param groups, the scheduler, the trainer state); a pickled object of any other class is refused.
    """

    def __init__(self, *args, source: str | Path = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._source = str(source)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = weights_only_reason(e)
            raise CorruptCheckpointError(f"{self._source}: item {fqn!r} refused: not plain data ({why}); "
                                         f"the checkpoint is corrupt or malicious") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def weights_only_reason(e: BaseException) -> str:
    """The cause inside torch's weights-only error, without its advice to disable the safety."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    elif "weights_only" in text:
        text = "unsupported content"
    return " ".join(text.split())[:200] or type(e).__name__


def read_metadata(part_dir: str | Path) -> Metadata:
    """The metadata of the DCP directory `part_dir` (safe parse)."""
    return read_metadata_file(Path(part_dir) / ".metadata")


# ----------------------------------------------------------------- CRCs of loads
def _crc_range(f, start: int, end: int, crc: int) -> int:
    f.seek(start)
    while start < end:
        chunk = f.read(min(_CHUNK, end - start))
        if not chunk:
            break
        crc, start = crc32(chunk, crc), start + len(chunk)
    return crc


def _whole_file_crc(path: Path, runs: list, size: int) -> int:
    """CRC-32 of the whole file from the runs read during a load; bytes no run covers are read now."""
    crc, pos = 0, 0
    with open(path, "rb") as f:
        for start, end, run_crc in sorted(runs):
            if end <= pos:
                continue  # the same bytes read by another rank
            if start < pos:  # partial overlap: not expected from DCP, read the new part
                crc, pos = _crc_range(f, pos, end, crc), end
                continue
            crc = _crc_range(f, pos, start, crc)  # a gap: bytes this load did not need
            crc, pos = crc32_combine(crc, run_crc, end - start), end
        return _crc_range(f, pos, size, crc)


def verify_reads(iter_dir: str | Path, part: str, shares: list[dict], manifest: dict | None) -> list[str]:
    """Compare the CRCs taken while loading `part` (one `SafeReader.segments` per rank) with the manifest.

    Every file that was read is checked as a whole; bytes of it that no rank needed are read
    to complete its CRC (none for a full resume). Returns problems naming the file.
    """
    if manifest is None:
        return []
    root, files, problems = Path(iter_dir), manifest.get("files", {}), []
    merged: dict[str, list] = {}
    for share in shares:
        for rel, runs in share.items():
            merged.setdefault(rel, []).extend(runs)
    for rel, runs in sorted(merged.items()):
        path, want = root / part / rel, files.get(f"{part}/{rel}")
        if want is None:
            problems.append(f"{path}: not listed in {layout.MANIFEST_FILE}")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: size {size} bytes, manifest says {want['size']}")
            continue
        got = f"{_whole_file_crc(path, runs, size) & 0xFFFFFFFF:08x}"
        if got != want[ALGORITHM]:
            problems.append(f"{path}: {ALGORITHM} mismatch (read {got}, {layout.MANIFEST_FILE} says "
                            f"{want[ALGORITHM]}): the file changed since the save")
    return problems


def check_reads(iter_dir: str | Path, part: str, shares: list[dict]) -> None:
    """`verify_reads` against the iteration's manifest; CorruptCheckpointError listing the problems."""
    root = Path(iter_dir)
    manifest = layout.read_manifest(root)
    if manifest is None and layout.is_committed(root):  # only upstream-style dirs go without one
        problems = [f"{root / layout.MANIFEST_FILE}: missing, but the iteration is committed (this toolkit writes "
                    f"the manifest before {layout.COMMITTED_MARKER}); integrity cannot be checked"]
    else:
        problems = verify_reads(root, part, shares, manifest)
    if problems:
        raise CorruptCheckpointError(f"checkpoint {root.name} ({root}) is damaged:\n  " + "\n  ".join(problems))


def check_reads_on_all_ranks(iter_dir: str | Path, segments: dict[str, Segments]) -> None:
    """Collective `check_reads` of several parts ({part: this rank's SafeReader.segments}).

    Every rank's runs go to rank 0, which checks them against the manifest; every rank then
    raises the same CorruptCheckpointError (or none).
    """
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    shares = [segments]
    if multi:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, segments)
    problem = None
    if not multi or dist.get_rank() == 0:
        try:
            for part in segments:
                check_reads(iter_dir, part, [s.get(part, {}) for s in shares])
        except CheckpointError as e:  # CorruptCheckpointError, or an unreadable manifest
            problem = str(e)
    if multi:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise CorruptCheckpointError(problem)


def is_damage(e: BaseException) -> bool:
    """True if `e` is (or DCP's per-rank CheckpointException carries) a CorruptCheckpointError."""
    failures = getattr(e, "failures", None) or {}
    return isinstance(e, CorruptCheckpointError) or any(
        isinstance(f[0] if isinstance(f, tuple) else f, CorruptCheckpointError) for f in failures.values())
