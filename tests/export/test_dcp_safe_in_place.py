"""SafeReader reads plain chunks straight into their destination: same values, same CRC accounting."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from cosmos_train.checkpoint.integrity import file_entry
from cosmos_train.errors import CorruptCheckpointError
from cosmos_train.export.dcp_chunk import read_layout
from cosmos_train.export.dcp_safe import SafePlanner, SafeReader, is_damage, verify_reads
from tests.export.test_copy_export import _save, _tensors


def _load(path, like: dict) -> tuple[dict, SafeReader]:
    out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in like.items()}
    reader = SafeReader(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, storage_reader=reader, planner=SafePlanner(source=path), no_dist=True)
    return out, reader


def test_another_dtype_is_staged_and_cast_the_same_way_as_unpickling(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "model", sd)
    like = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in sd.items()}
    got, reader = _load(ck, like)  # fp32/fp16 chunks into fp64 destinations: read, then copied with a cast
    for k, v in like.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert reader.in_place_items == 3
    assert verify_reads(tmp_path, "model", [reader.segments], _manifest(ck)) == []


def _manifest(path) -> dict:
    rels = [p.name for p in path.iterdir()]
    return {"files": {f"{path.name}/{r}": file_entry(path, r) for r in rels}}


def test_plain_chunks_load_in_place_and_the_rest_the_ordinary_way(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "model", sd)
    got, reader = _load(ck, sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    # net.t is stored transposed (strided): unpickled; net.e (empty) is never read; the other three in place.
    assert reader.in_place_items == 3
    assert verify_reads(tmp_path, "model", [reader.segments], _manifest(ck)) == []


def _chunk(ck, fqn):
    from cosmos_train.export.dcp_source import DcpSource

    r = DcpSource(ck)
    ((idx, info),) = [(i, s) for i, s in r.metadata.storage_data.items() if i.fqn == fqn]
    md = r.metadata.state_dict_metadata[fqn]
    path = ck / info.relative_path
    fd = os.open(path, os.O_RDONLY)
    try:
        return path, info, read_layout(fd, info.offset, info.length, md.properties.dtype, tuple(md.size))
    finally:
        os.close(fd)


def _flip(path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_data_byte_fails_the_chunk_crc_naming_file_and_tensor(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "model", sd)
    path, _, lay = _chunk(ck, "net.w")
    _flip(path, lay.data_start + 123)
    with pytest.raises(CheckpointException) as e:  # DCP wraps the reader's error
        _load(ck, sd)
    assert is_damage(e.value)
    (err, _), = e.value.failures.values()
    assert isinstance(err, CorruptCheckpointError)
    assert "crc32 mismatch in tensor 'net.w'" in str(err) and str(path) in str(err)


def test_bytes_around_the_data_still_count_in_the_file_crc(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "model", sd)
    manifest = _manifest(ck)
    path, info, lay = _chunk(ck, "net.w")
    _flip(path, info.offset + info.length - 30)  # inside the chunk's central directory, after the data
    got, reader = _load(ck, sd)  # the tensor itself is intact and read in place...
    assert torch.equal(got["net.w"], sd["net.w"]) and reader.in_place_items >= 1
    problems = verify_reads(tmp_path, "model", [reader.segments], manifest)  # ...but the file changed
    assert len(problems) == 1 and str(path) in problems[0] and "crc32 mismatch" in problems[0]


def test_two_items_filling_the_same_tensor_do_not_race(tmp_path):
    w = torch.randn(64, 32)
    ck = _save(tmp_path / "model", {"net.buf": w, "net_ema.buf": w.clone()})
    shared = torch.zeros(64, 32)  # like an EMA entry that is the model's own buffer
    reader = SafeReader(ck)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"net.buf": shared, "net_ema.buf": shared}, storage_reader=reader,
                 planner=SafePlanner(source=ck), no_dist=True)
    assert torch.equal(shared, w) and reader.in_place_items == 2  # one read in place, one staged


def _reshard_on_ranks(rank, world, ck):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    like = {"net.w": torch.zeros(300, 70), "net.h": torch.zeros(9, dtype=torch.float16)}
    targets = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in like.items()}
    reader = SafeReader(ck)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(targets, storage_reader=reader, planner=SafePlanner(source=ck))
    return {k: v.full_tensor() for k, v in targets.items()}, reader.in_place_items, reader.segments


def test_a_chunk_split_over_more_ranks_is_read_row_range_by_row_range(tmp_path):
    from tests.dist import run_ranks

    sd = _tensors()
    ck = _save(tmp_path / "model", sd)  # one process: every tensor is one chunk
    manifest = _manifest(ck)
    results = run_ranks(_reshard_on_ranks, 2, ck, timeout=120)
    for got, in_place, _ in results:
        assert torch.equal(got["net.w"], sd["net.w"]) and torch.equal(got["net.h"], sd["net.h"])
        assert in_place == 2  # each rank read its rows of both chunks in place
    shares = [segments for _, _, segments in results]
    assert verify_reads(tmp_path, "model", shares, manifest) == []  # the rows plus the gaps make the files
    path, _, lay = _chunk(ck, "net.w")
    _flip(path, lay.data_start + lay.nbytes - 10)  # in rank 1's rows
    results = run_ranks(_reshard_on_ranks, 2, ck, timeout=120)
    problems = verify_reads(tmp_path, "model", [segments for _, _, segments in results], manifest)
    assert len(problems) == 1 and "crc32 mismatch" in problems[0] and str(path) in problems[0]
