"""Read tensors out of one DCP directory a few at a time, without loading the whole state.

The `TensorSource` of a DCP directory. `FileSystemReader.read_metadata()` gives every
key's dtype, shape and the file slices holding its chunks without reading data.
`DcpSource.load(keys)`
then reads only those keys (all chunks, from every rank's file) into freshly
allocated full tensors via `dcp.load` with a partial-load planner.
"""

from __future__ import annotations

import ctypes
import functools
import io
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from cosmos_train.errors import CheckpointError
from cosmos_train.export.dcp_safe import SafePlanner, SafeReader, check_reads
from cosmos_train.export.tensor_source import STORAGE_ERRORS, TensorEntry

T = TypeVar("T")


class DcpSource:
    """Tensor entries of a DCP dir (in stored order) and bounded reads of a subset of them.

    Checks up front that every file the metadata refers to exists and is long
    enough, so a missing or truncated shard fails before any output is written,
    with the file named.
    """

    def __init__(self, path: str | Path, *, check_files: bool = True):
        self.path = Path(path)
        meta_file = self.path / ".metadata"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.path}: not a DCP checkpoint directory (no .metadata file)")
        # SafeReader parses `.metadata` once (dcp.load asks on every call), runs no code from the
        # files, and checksums every byte it reads (`check_checksums`)
        self._reader = SafeReader(self.path)
        self.metadata = self._reader.read_metadata()  # CheckpointError naming the file when unreadable
        self.entries: dict[str, TensorEntry] = {}
        self.non_tensor_keys: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.entries[key] = TensorEntry(key, md.properties.dtype, tuple(md.size))
            else:
                assert isinstance(md, BytesStorageMetadata), type(md)
                self.non_tensor_keys.append(key)
        if check_files:  # inspect lists a damaged checkpoint's tensors and reports per tensor instead
            self._check_files()
        self.files = sorted({self.path / i.relative_path for i in (self.metadata.storage_data or {}).values()})
        self._arena: torch.Tensor | None = None

    def _check_files(self) -> None:
        problems = shard_problems(self.path, self.metadata)
        if problems:
            raise CheckpointError(problems[0] + "; the checkpoint is incomplete or was copied partially")

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read `keys` (full, unsharded tensors) in one pass over the shard files.

        The tensors are views into one buffer that the next `load` reuses: use
        (write, convert, clone) them before calling `load` again. Reusing it keeps
        the resident size flat; fresh allocations of tens of MB per tensor leave
        the allocator's heap fragmented and RSS creeping up over a long export.
        """
        _return_free_heap_to_os()
        sd = {}
        offsets, end = [], 0
        for k in keys:
            offsets.append(end)
            end += -(-self.entries[k].nbytes // 64) * 64  # 64-byte aligned slots
        if self._arena is None or self._arena.numel() < end:
            self._arena = None  # free the old one before allocating the larger one
            self._arena = torch.empty(end, dtype=torch.uint8)
        for k, off in zip(keys, offsets, strict=True):
            e = self.entries[k]
            sd[k] = self._arena[off:off + e.nbytes].view(e.dtype).view(e.shape) if e.nbytes else \
                torch.empty(e.shape, dtype=e.dtype)
        try:
            with warnings.catch_warnings():
                # no_dist is the point here; DCP warns that it assumes a single process.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(sd, storage_reader=self._reader,
                         planner=SafePlanner(allow_partial_load=True, source=self.path), no_dist=True)
        except STORAGE_ERRORS as e:
            inner = _unwrap(e)
            if isinstance(inner, CheckpointError):  # our reader already named the file and the tensor
                raise inner from None
            first_line = (str(inner).strip().splitlines() or [""])[0][:160]
            bad = self._find_bad_file(set(keys))
            raise CheckpointError(f"{bad or self.path}: failed to read {keys[0]!r}"
                                  f"{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''}: "
                                  f"{type(inner).__name__}: {first_line} (corrupt shard file?)") from e
        return sd

    def check_checksums(self, extra: dict | None = None) -> None:
        """Compare the CRCs of everything read so far (plus `extra` runs read by other means, e.g. the
        copy engine) with the iteration's MANIFEST.json; CorruptCheckpointError naming the file."""
        check_reads(self.path.parent, self.path.name, [self._reader.segments, extra or {}])

    def _find_bad_file(self, keys: set[str]) -> Path | None:
        """Diagnosis after a failed read: the first shard file whose chunk of `keys` does not load."""
        for idx, info in (self.metadata.storage_data or {}).items():
            if idx.fqn not in keys or info.transform_descriptors:
                continue
            f = self.path / info.relative_path
            try:
                with open(f, "rb") as fh:
                    fh.seek(info.offset)
                    torch.load(io.BytesIO(fh.read(info.length)), weights_only=True)
            except Exception:  # noqa: BLE001 - any failure marks this file
                return f
        return None


def shard_problems(part_dir: Path, metadata) -> list[str]:
    """Every shard file that a DCP `.metadata` points into exists and is long enough; else one line each."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, end in sorted(need.items()):
        f = Path(part_dir) / rel
        if not f.is_file():
            problems.append(f"{f}: shard file missing (listed in {Path(part_dir) / '.metadata'})")
        elif (size := f.stat().st_size) < end:
            problems.append(f"{f}: shard file truncated ({size} bytes, the metadata needs {end})")
    return problems


def _return_free_heap_to_os() -> None:
    """glibc `malloc_trim(0)`; a no-op elsewhere.

    DCP reads every chunk into a fresh buffer (8-32 MiB for DiT tensors) before
    copying it into our target. glibc serves such sizes from the heap once its
    dynamic mmap threshold has grown, and freed heap memory is not returned, so
    without this RSS creeps up by hundreds of MB over a multi-GB export (measured:
    0.49-0.83 GiB peak at 4 GB without, a steady 0.40 GiB with; ~0.1 s in total).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the libc this process already uses
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def _unwrap(e: BaseException) -> BaseException:
    """The reader's own exception inside DCP's per-rank CheckpointException, if there is one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            return wrapped[0]
    return e


def group_by_bytes(items: list[T], budget: int, size: Callable[[T], int] = lambda e: e.nbytes) -> Iterator[list[T]]:
    """Consecutive groups whose `size` sums to at most `budget` (a larger item forms its own group)."""
    group: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if group and total + n > budget:
            yield group
            group, total = [], 0
        group.append(item)
        total += n
    if group:
        yield group
