"""A small file system for disk-full tests: a real tmpfs where mounting works (root), else a stub.

The stub gives the project's writers (DCP shards through the checksumming file system, `.pt`
and `.safetensors` outputs, atomic control files) a budget of `size` minus the bytes already
under the root (so deleting files frees space, as on a real disk), raises ENOSPC past it, and
reports the remaining budget as the free space.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest


def _try_mount(path: Path, size: int) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _used(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class _Budget:
    def __init__(self, root: Path, size: int) -> None:
        self.root, self.size = root, size

    @property
    def left(self) -> int:
        return max(0, self.size - _used(self.root))

    def opener(self, real_open, *, by_fd: bool = False):
        budget = self

        def patched(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{file}") if by_fd else os.path.abspath(file)
            if any(c in mode for c in "wa") and Path(path).is_relative_to(budget.root):
                write = f.write

                def limited(b):
                    n = len(b.encode()) if isinstance(b, str) else memoryview(b).nbytes
                    f.flush()  # so the bytes written so far count as used
                    if n > budget.left:
                        raise OSError(errno.ENOSPC, "No space left on device (stub)", str(file))
                    return write(b)

                f.write = limited
            return f

        return patched


class SmallDisk:
    """`root` lives on a file system of about `size` bytes; `kind` is "tmpfs" or "stub"."""

    def __init__(self, root: Path, kind: str, budget: _Budget | None) -> None:
        self.root, self.kind, self._budget = root, kind, budget

    def free(self) -> int:
        if self._budget is not None:
            return self._budget.left
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int, where: Path | None = None) -> None:
        """Occupy the space (a real file, under `where` or the root) so that about `leave` bytes stay free."""
        where = where or self.root
        with open(where / f"filler-{uuid.uuid4().hex}", "wb") as f:  # the real open: not budgeted
            f.write(b"\0" * max(0, self.free() - leave))


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    def make(size: int) -> SmallDisk:
        root = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        root.mkdir()
        if _try_mount(root, size):
            mounted.append(root)
            return SmallDisk(root, "tmpfs", None)
        budget = _Budget(root, size)
        from cosmos_train import disk
        from cosmos_train.checkpoint import integrity
        from cosmos_train.export import pt_io, safetensors_io

        for mod in (integrity, pt_io, safetensors_io):
            monkeypatch.setattr(mod, "open", budget.opener(builtins.open), raising=False)
        monkeypatch.setattr(disk, "free_bytes", lambda p: budget.left)
        monkeypatch.setattr(os, "fdopen", budget.opener(os.fdopen, by_fd=True))  # atomic_write_text
        return SmallDisk(root, "stub", budget)

    mounted: list[Path] = []
    yield make
    for root in mounted:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
