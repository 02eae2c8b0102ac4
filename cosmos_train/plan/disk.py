"""`--measure-disk`: a quick write + fsync of a scratch file to measure the output dir's bandwidth."""

from __future__ import annotations

import os
import time
from pathlib import Path


def measure_write_gbps(directory: str | Path, *, mib: int = 256) -> float:
    """GB/s (1e9 bytes) of writing `mib` MiB to a temporary file in `directory`, fsync included.

    The file is removed afterwards. One process writing: the figure is per writer, a lower bound
    of what a node's ranks reach together.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".plan_disk_probe_{os.getpid()}"
    chunk = os.urandom(1 << 20)
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    return mib * (1 << 20) / seconds / 1e9
