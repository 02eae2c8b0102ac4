"""The byte-range copy engine: kernel and buffered copies, CRC32s on the way, dtype casts, fallback."""

from __future__ import annotations

import errno
import os
import zlib

import pytest
import torch

from cosmos_train.export import range_copy
from cosmos_train.export.range_copy import Range, copy_ranges


def _sources(tmp_path):
    a, b = os.urandom(3 << 20), os.urandom(1 << 20)
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    return [tmp_path / "a.bin", tmp_path / "b.bin"], [a, b]


def _plan(data):
    a, b = data
    # Out of order, across files, one range larger than a piece, one empty range.
    ranges = [Range(1, 100, 5000, 0), Range(0, 17, len(a) - 17, 5000), Range(1, 0, 0, 5000), Range(0, 0, 10,
                                                                                                    len(a) + 4983)]
    want = b[100:5100] + a[17:] + a[:10]
    return ranges, want


def _run(tmp_path, srcs, ranges, **kw):
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        stats = copy_ranges(srcs, fd, ranges, piece_bytes=1 << 20, **kw)
    finally:
        os.close(fd)
    return out.read_bytes(), stats


@pytest.mark.parametrize("mode,threads", [("kernel", 1), ("kernel", 3), ("buffered", 1), ("buffered", 3),
                                          ("auto", 2)])
def test_copy_modes_give_the_same_bytes(tmp_path, mode, threads):
    srcs, data = _sources(tmp_path)
    ranges, want = _plan(data)
    got, stats = _run(tmp_path, srcs, ranges, mode=mode, threads=threads)
    assert got == want
    assert stats.bytes_read == stats.bytes_written == len(want)
    if mode == "buffered":
        assert stats.kernel_bytes == 0
    else:  # tmpfs and ext4 both support copy_file_range
        assert stats.kernel_bytes == len(want) and stats.buffered_bytes == 0


def test_checksum_computed_in_the_same_pass(tmp_path):
    srcs, data = _sources(tmp_path)
    ranges, want = _plan(data)
    got, stats = _run(tmp_path, srcs, ranges, checksum=True, threads=2)
    assert got == want and stats.kernel_bytes == 0  # a CRC needs the bytes in user space
    for r, crc in zip(ranges, stats.crcs, strict=True):
        assert crc == zlib.crc32(data[r.src][r.src_offset:r.src_offset + r.length])
    assert stats.out_crcs == stats.crcs
    with pytest.raises(ValueError, match="checksum needs the bytes"):
        _run(tmp_path, srcs, ranges, checksum=True, mode="kernel")


def test_convert_casts_and_checksums_the_written_bytes(tmp_path):
    x = torch.randn(3 * (1 << 18) + 5)  # > one 1 MiB piece, odd length
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    conv = (torch.float32, torch.bfloat16)
    ranges = [Range(0, 4 * 5, 4 * (x.numel() - 5), 64, conv), Range(0, 0, 20, 0, conv)]
    got, stats = _run(tmp_path, [tmp_path / "x.bin"], ranges, threads=2)
    want = x.bfloat16().view(torch.uint8).numpy().tobytes()
    assert got[64:] == want[10:] and got[:10] == want[:10]
    assert ranges[0].out_length == len(want) - 10
    assert stats.out_crcs[0] == zlib.crc32(want[10:]) and stats.crcs[0] is None  # no source CRC asked for


def test_falls_back_to_buffered_where_copy_file_range_is_refused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(range_copy.os, "copy_file_range", refuse)
    srcs, data = _sources(tmp_path)
    ranges, want = _plan(data)
    got, stats = _run(tmp_path, srcs, ranges, threads=2)
    assert got == want and stats.kernel_bytes == 0 and "cross-device" in stats.fallback_reason
    with pytest.raises(OSError, match="copy_file_range unavailable"):
        _run(tmp_path, srcs, ranges, mode="kernel")


@pytest.mark.parametrize("mode", ["kernel", "buffered"])
def test_short_source_names_the_file(tmp_path, mode):
    srcs, data = _sources(tmp_path)
    with pytest.raises(EOFError, match=r"b\.bin.*ended"):
        _run(tmp_path, srcs, [Range(1, len(data[1]) - 10, 100, 0)], mode=mode)
    with pytest.raises(EOFError, match=r"b\.bin.*ended"):  # starting past the end, too
        _run(tmp_path, srcs, [Range(1, len(data[1]) + 10, 100, 0)], mode=mode)


def test_write_errors_keep_their_errno(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(range_copy.os, "pwrite", full)
    srcs, data = _sources(tmp_path)
    ranges, _ = _plan(data)
    with pytest.raises(OSError, match="No space left") as e:
        _run(tmp_path, srcs, ranges, mode="buffered")
    assert e.value.errno == errno.ENOSPC
