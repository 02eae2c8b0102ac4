"""`preadv_all`: fill buffers from a file at an offset, however many calls the kernel needs."""

from __future__ import annotations

import os


def preadv_all(fd: int, views: list[memoryview], offset: int) -> int:
    """`os.preadv` until every view is full or the file ends; bytes read (short only at the end of the file)."""
    total, views = 0, [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views, offset + total)
        if n == 0:
            break
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total
