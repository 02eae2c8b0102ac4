"""CRC-32 (zlib's) helpers: `combine` joins the CRCs of consecutive byte runs without the bytes.

The stdlib's `zlib` computes CRC-32 (releasing the GIL for large buffers) but does not expose
zlib's `crc32_combine`; this is it, in Python (~10 us per call). It lets readers and copies
that see a file in pieces (threads, ranks, skipped headers) check it against one CRC-32.
"""

from __future__ import annotations

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
