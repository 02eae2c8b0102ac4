"""crc32.combine: the CRC-32 of a concatenation from its parts' CRCs."""

from __future__ import annotations

import os
import zlib

import pytest

from cosmos_train.crc32 import combine, crc32


@pytest.mark.parametrize("len2", [0, 1, 7, 1000, 65537])
def test_combine_equals_crc_of_concatenation(len2):
    a, b = os.urandom(333), os.urandom(len2)
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_is_zlibs_on_buffers_and_with_a_start_value():
    data = bytearray(os.urandom(1 << 20))
    view = memoryview(data)[17:]
    assert crc32(view) == zlib.crc32(view)
    assert crc32(view[:1000], 0xDEADBEEF) == zlib.crc32(view[:1000], 0xDEADBEEF)
    assert crc32(b"") == 0
