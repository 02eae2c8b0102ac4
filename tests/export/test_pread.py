"""preadv_all fills several buffers from one offset, and says how much a short file gave."""

from __future__ import annotations

import os

from cosmos_train.export.pread import preadv_all


def test_fills_views_in_order_and_stops_at_the_end_of_the_file(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    a, b, c = bytearray(100), bytearray(0), bytearray(5000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert preadv_all(fd, [memoryview(a), memoryview(b), memoryview(c)], 17) == 5100
        assert bytes(a) + bytes(c) == data[17:5117]
        tail = bytearray(300)
        assert preadv_all(fd, [memoryview(tail)], 9_900) == 100  # only 100 bytes are left
        assert bytes(tail[:100]) == data[9_900:]
    finally:
        os.close(fd)
