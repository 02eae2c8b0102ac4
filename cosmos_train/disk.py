"""Disk-full (ENOSPC) detection and the one message for it: the path, the bytes needed, the bytes free."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException | None) -> bool:
    """True if `e`, its causes, or (DCP's CheckpointException) any rank's failure is ENOSPC/EDQUOT."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                if is_disk_full(f[0] if isinstance(f, tuple) else f):
                    return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path)
    for cand in (p, *p.parents):
        if cand.exists():
            try:
                return shutil.disk_usage(cand).free
            except OSError:
                return None
    return None


def _size(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def disk_full_message(path: str | Path, *, need: int | None, what: str) -> str:
    """`PATH: disk full (ENOSPC) writing WHAT: needs about N, M free`."""
    return (f"{path}: disk full (ENOSPC) while writing {what}: needs about {_size(need)}, "
            f"{_size(free_bytes(path))} free on that file system; free space (or lower checkpoint.keep_last) "
            f"and retry")
