"""Write-behind for large output files: start writeback as bytes are written, drop pages once clean.

Writing a multi-GB file into the page cache and fsyncing at the end does the
work twice in sequence: first every page is dirtied (each one a freshly
allocated page, which on a VM with free-page reporting is a host fault), then
the fsync waits for all of it to reach the disk. `WriteBehind` overlaps the two:
each written range is handed to `posix_fadvise(DONTNEED)`, which on Linux starts
asynchronous writeback of its dirty pages (and drops nothing that is still dirty);
once `lag_bytes` more have been written, the same call on the old range drops its
now-clean pages, so the cache holds about `lag_bytes` of the output and recycles
those pages for the next writes. The final fsync then has almost nothing left.

Measured on the 2-core dev box (1 GB, 8 MiB pieces, median of 4): buffered copy
with CRC32 3.15 s -> 0.91 s, `copy_file_range` 1.02 s -> 0.77 s, fsync included.
Durability is unchanged: callers still fsync before they rename.
Where `posix_fadvise` does not exist (macOS) it is a no-op.
"""

from __future__ import annotations

import os
import threading
from collections import deque

LAG_BYTES = 64 << 20  # about a device queue's worth: writeback of a range has finished by the time it is dropped
MIN_BYTES = 1 << 20  # smaller writes (zip headers, small tensors) are left to the final fsync: a syscall each


class WriteBehind:
    """Tell the kernel about ranges of `fd` as they are written (thread-safe)."""

    def __init__(self, fd: int, lag_bytes: int = LAG_BYTES):
        self._fd, self._lag = fd, lag_bytes
        self._pending: deque[tuple[int, int]] = deque()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self.enabled = hasattr(os, "posix_fadvise")

    def written(self, offset: int, length: int) -> None:
        """`length` bytes at `offset` were just written: start their writeback, drop older clean ones."""
        if not self.enabled or length < MIN_BYTES:
            return
        self._advise(offset, length)  # starts writeback (WB_SYNC_NONE); the pages are still dirty
        drop = []
        with self._lock:
            self._pending.append((offset, length))
            self._pending_bytes += length
            while self._pending_bytes > self._lag and self._pending:
                o, n = self._pending.popleft()
                self._pending_bytes -= n
                drop.append((o, n))
        for o, n in drop:
            self._advise(o, n)  # written back by now (or still in flight: then kept, harmlessly)

    def _advise(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # a file system that refuses advice (ESPIPE on a pipe, EINVAL): advice only
            self.enabled = False
