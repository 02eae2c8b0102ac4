"""CRC-32 (zlib's polynomial, as in zip files and MANIFEST.json): `crc32` and `combine`.

`crc32(data, value=0)` is ISA-L's (python-isal: carry-less multiply, ~20 GB/s on one core
here against ~4 GB/s for the stdlib's zlib, same results, GIL released) where it is
installed, else zlib's. Every checksum over checkpoint bytes goes through it: the
manifest's CRCs during a save, the checks during loads and consolidation.

The stdlib does not expose zlib's `crc32_combine`; `combine` is it, in Python (~10 us per
call). It lets readers and copies that see a file in pieces (threads, ranks, skipped
headers) check it against one CRC-32.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform: the stdlib's, 5x slower, same values
    from zlib import crc32

__all__ = ["combine", "crc32"]

_POLY = 0xEDB88320  # CRC-32 (zlib), reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's multmodp)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) mod p
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    if len2 <= 0:
        return crc1  # B is empty (its CRC is 0)
    p, n, k = 1 << 31, len2, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2
