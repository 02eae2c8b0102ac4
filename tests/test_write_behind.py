"""Write-behind: writeback started as ranges are written, clean pages dropped past the lag, bytes intact."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import pytest

from cosmos_train.write_behind import WriteBehind

MIB = 1 << 20


def _resident_pages(path, offset: int, length: int) -> int:
    """Pages of `path[offset:offset+length]` in the page cache (Linux mincore on a shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    page = mmap.PAGESIZE
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return sum(vec[i] & 1 for i in range(offset // page, (offset + length - 1) // page + 1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and mincore semantics are Linux's")
def test_clean_ranges_past_the_lag_leave_the_page_cache_and_the_bytes_stay(tmp_path):
    path = tmp_path / "out.bin"
    data = os.urandom(8 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        behind = WriteBehind(fd, lag_bytes=2 * MIB)
        for i in range(4):  # writeback starts per piece; the last 2 MiB stay pending
            os.pwrite(fd, data[i * MIB:(i + 1) * MIB], i * MIB)
            behind.written(i * MIB, MIB)
        os.fsync(fd)  # now clean
        assert _resident_pages(path, 2 * MIB, 2 * MIB) > 0
        for i in range(4, 8):  # pushes [2, 4) MiB past the lag: dropped, being clean
            os.pwrite(fd, data[i * MIB:(i + 1) * MIB], i * MIB)
            behind.written(i * MIB, MIB)
        assert _resident_pages(path, 2 * MIB, 2 * MIB) == 0
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_pipe_refuses_advice_and_writing_goes_on():
    r, w = os.pipe()
    try:
        behind = WriteBehind(w)
        os.write(w, b"x" * 10)
        behind.written(0, MIB)  # ESPIPE: advice switched off, no error
        assert not behind.enabled
        assert os.read(r, 10) == b"x" * 10
    finally:
        os.close(r)
        os.close(w)
