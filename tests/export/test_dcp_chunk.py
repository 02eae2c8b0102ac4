"""Locating a DCP chunk's raw bytes from its zip's two ends: exact bytes, whole-chunk CRC, refusals."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from cosmos_train.export.dcp_chunk import read_layout
from cosmos_train.export.dcp_source import DcpSource
from tests.export.test_copy_export import _save, _tensors


def _chunks(r: DcpSource):
    """`{fqn: (file, offset, length, dtype, shape)}` of the single-chunk tensors."""
    out = {}
    for idx, info in r.metadata.storage_data.items():
        md = r.metadata.state_dict_metadata[idx.fqn]
        out[idx.fqn] = (r.path / info.relative_path, info.offset, info.length, md.properties.dtype, tuple(md.size))
    return out


@pytest.mark.parametrize("crc32", [True, False])
def test_layout_gives_the_tensor_bytes_and_the_rest_of_the_chunk(tmp_path, crc32):
    sd = _tensors()
    r = DcpSource(_save(tmp_path / "ck", sd, crc32=crc32))
    for fqn in ("net.w", "net.h", "net.n", "net.e"):
        path, off, length, dtype, shape = _chunks(r)[fqn]
        fd = os.open(path, os.O_RDONLY)
        try:
            lay = read_layout(fd, off, length, dtype, shape)
        finally:
            os.close(fd)
        chunk = path.read_bytes()[off:off + length]
        data = chunk[lay.data_start - off:lay.data_start - off + lay.nbytes]
        assert data == sd[fqn].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert lay.head + data + lay.tail == chunk  # a reader can CRC the whole chunk from these
        assert lay.crc32 == (zlib.crc32(data) if crc32 or not data else None)


def test_strided_chunks_and_wrong_shapes_are_refused(tmp_path):
    r = DcpSource(_save(tmp_path / "ck", _tensors()))
    chunks = _chunks(r)
    path, off, length, dtype, shape = chunks["net.t"]  # transposed: torch.save keeps the strides
    wpath, woff, wlen, wdtype, wshape = chunks["net.w"]
    fd, wfd = os.open(path, os.O_RDONLY), os.open(wpath, os.O_RDONLY)
    try:
        assert read_layout(fd, off, length, dtype, shape) is None
        assert read_layout(wfd, woff, wlen, wdtype, (wshape[1], wshape[0])) is None  # same bytes, other shape
        assert read_layout(wfd, woff, wlen, torch.int32, wshape) is None
        assert read_layout(wfd, woff + 1, wlen - 1, wdtype, wshape) is None  # not at a chunk's start
        assert read_layout(wfd, woff, wlen - 1, wdtype, wshape) is None  # truncated chunk
    finally:
        os.close(fd)
        os.close(wfd)


@pytest.mark.parametrize("guess", [None, "right", "wrong"])
def test_read_chunk_into_fills_the_tensor_whatever_the_layout_guess(tmp_path, guess):
    from cosmos_train.export.dcp_chunk import read_chunk_into

    sd = _tensors()
    r = DcpSource(_save(tmp_path / "ck", sd))
    path, off, length, dtype, shape = _chunks(r)["net.w"]
    info = next(i for idx, i in r.metadata.storage_data.items() if idx.fqn == "net.w")
    fd = os.open(path, os.O_RDONLY)
    try:
        start = read_layout(fd, off, length, dtype, shape).data_start - off
        hints = {} if guess is None else {(dtype, shape, length): start + (0 if guess == "right" else 64)}
        target = torch.full(shape, float("nan"), dtype=dtype)
        crc = read_chunk_into(fd, path, info, "net.w", target, hints)
    finally:
        os.close(fd)
    assert torch.equal(target, sd["net.w"])
    assert crc == zlib.crc32(path.read_bytes()[off:off + length])  # the whole chunk, as the manifest needs
    assert hints[(dtype, shape, length)] == start  # a wrong guess is corrected for the next chunk
