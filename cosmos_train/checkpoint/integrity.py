"""Checkpoint integrity: a manifest of files, sizes and CRC32s, and checks that read no tensors.

`MANIFEST.json` sits next to the parts of an iteration and is written before
`COMMITTED`. `verify` compares the files on disk against it (and, for every part,
the DCP `.metadata` against the shard files it points into). Upstream iteration
dirs have no manifest; only the DCP metadata checks apply to them.

CRC32 (`cosmos_train.crc32`: ISA-L's, ~20 GB/s a core, or zlib's) is the checksum: it
detects truncation and bit rot, not tampering, which is all a training checkpoint needs.
"""

from __future__ import annotations

import io
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystem

from cosmos_train.crc32 import crc32
from cosmos_train.layout import COMMITTED_MARKER, MANIFEST_FILE, PARTS, read_manifest  # noqa: F401
from cosmos_train.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
ALGORITHM = "crc32"
_CHUNK = 8 << 20


def checksum_file(path: str | Path) -> str:
    """CRC32 of a file's bytes as 8 hex digits, read in 8 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = crc32(chunk, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


class _ChecksumWriter(io.IOBase):
    """A write-only file stream that keeps the CRC32 and size of everything written through it."""

    def __init__(self, f) -> None:
        self._f, self.crc, self.size = f, 0, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = self._f.write(view)
        self.crc, self.size = crc32(view[:n], self.crc), self.size + n
        return n

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        self.flush()
        self._f.close()
        super().close()


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system, checksumming each file while it is written.

    The manifest then needs no second pass over the bytes. Only this process's writes are
    seen (not a writer subprocess), and a renamed file (DCP's `.metadata`) loses its
    entry: callers checksum whatever `entries` lacks by reading it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[Path, dict] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with open(path, mode) as f:
            stream = _ChecksumWriter(f)
            yield stream
            stream.flush()
        self.entries[Path(path)] = {"size": stream.size, ALGORITHM: f"{stream.crc & 0xFFFFFFFF:08x}"}

    def take(self, root: Path) -> dict[str, dict]:
        """Entries of files under `root` (relative paths), removed from the record."""
        root = Path(root)
        mine = {p: e for p, e in self.entries.items() if root in p.parents}
        for p in mine:
            del self.entries[p]
        return {str(p.relative_to(root)): e for p, e in mine.items() if p.exists()}


def file_entry(root: str | Path, rel: str) -> dict:
    """`{"size", "crc32"}` of `root/rel`."""
    p = Path(root) / rel
    return {"size": p.stat().st_size, ALGORITHM: checksum_file(p)}


def data_files(iter_dir: str | Path) -> list[str]:
    """Relative paths of every file of the iteration that the manifest covers, sorted."""
    root = Path(iter_dir)
    skip = {MANIFEST_FILE, COMMITTED_MARKER}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip)


def write_manifest(iter_dir: str | Path, entries: dict[str, dict], *, extra: dict | None = None) -> Path:
    """Write `MANIFEST.json` (fsynced) with `entries` {relative path: {"size", "crc32"}}."""
    from cosmos_train.layout import atomic_write_text

    doc = {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, **(extra or {}),
           "files": dict(sorted(entries.items()))}
    path = Path(iter_dir) / MANIFEST_FILE
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def _dcp_metadata_problems(part_dir: Path) -> list[str]:
    """Every shard file named in the part's `.metadata` exists and is long enough."""
    from cosmos_train.export.dcp_safe import read_metadata_file
    from cosmos_train.export.dcp_source import shard_problems

    meta_path = part_dir / ".metadata"
    if not meta_path.is_file():
        return [f"{meta_path}: missing DCP metadata file"]
    try:
        md = read_metadata_file(meta_path)
    except CheckpointError as e:
        return [str(e)]
    return shard_problems(part_dir, md)


def verify(iter_dir: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems found in an iteration dir, as messages naming the file; [] means it is intact.

    Checks the manifest (presence, sizes, and CRC32s when `checksums`) and each part's
    DCP metadata against its shard files. Loads no tensors.
    """
    root = Path(iter_dir)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    problems: list[str] = []
    try:
        manifest = read_manifest(root)
    except CheckpointError as e:
        manifest, problems = None, [str(e)]
    if manifest is None and not problems and (root / COMMITTED_MARKER).is_file():
        # COMMITTED is only ever written by this toolkit, always after the manifest: its absence is damage
        problems.append(f"{root / MANIFEST_FILE}: missing, but the iteration is committed (this toolkit writes "
                        f"the manifest before {COMMITTED_MARKER}); integrity cannot be checked")
    if manifest is not None:
        for rel, want in manifest.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                problems.append(f"{f}: missing (listed in {MANIFEST_FILE})")
                continue
            size = f.stat().st_size
            if size != want["size"]:
                problems.append(f"{f}: size {size} bytes, manifest says {want['size']}")
            elif checksums and checksum_file(f) != want[ALGORITHM]:
                problems.append(f"{f}: {ALGORITHM} mismatch (contents changed since the save)")
    parts = [p for p in PARTS if (root / p).is_dir()]
    if not parts:
        problems.append(f"{root}: no checkpoint parts ({', '.join(PARTS)}) found")
    for part in parts:
        problems += [p for p in _dcp_metadata_problems(root / part) if p not in problems]
    return problems


def adopt_uncommitted(ckpt_dir: str | Path) -> list[Path]:
    """Commit every marker-less `iter_X` whose manifest fully verifies; warn about (and keep) the rest.

    Such a dir is complete when a crash fell between its rename and its marker (the manifest
    is written before the rename). Returns the iterations committed here.
    """
    from cosmos_train import layout

    adopted = []
    for it in layout.uncommitted_dirs(ckpt_dir):
        problems = verify(it) if (it / MANIFEST_FILE).is_file() else [f"{it / MANIFEST_FILE}: missing"]
        if problems:
            log.warning("%s has no %s marker and is not complete (%s); kept, not loaded", it, COMMITTED_MARKER,
                        problems[0])
            continue
        layout.atomic_write_text(it / COMMITTED_MARKER, "committed\n")
        adopted.append(it)
        log.warning("%s had no %s marker but its manifest verifies (a crash between rename and marker): "
                    "committed it", it, COMMITTED_MARKER)
    if adopted:
        newest = layout.committed_iterations(ckpt_dir)[-1][1]
        layout.atomic_write_text(Path(ckpt_dir) / layout.LATEST_FILE, newest.name + "\n")
    return adopted


def checks_run(iter_dir: str | Path, *, checksums: bool = True) -> list[str]:
    """What `verify` (plus a read-back) checks for this iteration, for reports such as `inspect --verify`."""
    root = Path(iter_dir)
    if (root / MANIFEST_FILE).is_file():
        done = ["manifest (every file present, sizes)"] + (["CRC32 of every file"] if checksums else [])
    else:
        done = ["no manifest (upstream checkpoint): file checksums not available"]
    return done + ["DCP metadata against shard files"]


def check_loadable(iter_dir: str | Path, parts: tuple[str, ...] = PARTS) -> None:
    """Raise CheckpointError naming the iteration and file if a needed part is missing or damaged.

    Cheap (sizes and DCP metadata only), so it runs before every load.
    """
    root = Path(iter_dir)
    wanted = tuple(str(root / part) + "/" for part in parts) + (str(root / MANIFEST_FILE),)
    problems = [p for p in verify(root, checksums=False) if p.startswith(wanted)]
    for part in parts:
        if not (root / part).is_dir():
            problems.insert(0, f"{root / part}: part directory missing")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {root.name} ({root}) is damaged:\n  {shown}")
