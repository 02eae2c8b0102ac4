"""A small file system for disk-full tests: a real tmpfs where mounting works (root), else a stub.

The stub gives the project's writers (DCP shards through the checksumming file system, `.pt`
and `.safetensors` outputs, atomic control files) a shared byte budget and raises ENOSPC past
it, and reports the remaining budget as the free space.
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


class _Budget:
    def __init__(self, root: Path, size: int) -> None:
        self.root, self.left = root, size

    def opener(self, real_open, *, by_fd: bool = False):
        budget = self

        def patched(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{file}") if by_fd else os.path.abspath(file)
            if any(c in mode for c in "wa") and Path(path).is_relative_to(budget.root):
                write = f.write

                def limited(b):
                    n = len(b.encode()) if isinstance(b, str) else memoryview(b).nbytes
                    if n > budget.left:
                        budget.left = 0
                        raise OSError(errno.ENOSPC, "No space left on device (stub)", str(file))
                    budget.left -= n
                    return write(b)

                f.write = limited
            return f

        return patched


class SmallDisk:
    """`root` lives on a file system of about `size` bytes; `kind` is "tmpfs" or "stub"."""

    def __init__(self, root: Path, kind: str, budget: _Budget | None) -> None:
        self.root, self.kind, self._budget = root, kind, budget

    def fill(self, leave: int) -> None:
        """Occupy the space so that about `leave` bytes stay free."""
        if self._budget is not None:
            self._budget.left = leave
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        with open(self.root / f"filler-{uuid.uuid4().hex}", "wb") as f:
            f.write(b"\0" * max(0, free - leave))


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
