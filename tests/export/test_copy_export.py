"""Consolidation by byte-range copy: chunk byte planning, .pt records and CRCs, fallbacks, source CRC checks.

The 2-rank FSDP2 checkpoints (uneven dim-0 chunks, EMA, buffers) are covered by
test_consolidate.py, which goes through this path too; here single-process DCP
saves pin down the cases that path must get right.
"""

from __future__ import annotations

import warnings
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cosmos_train.export.consolidate import consolidate
from cosmos_train.export.dcp_source import DcpSource
from cosmos_train.errors import CheckpointError
from cosmos_train.export import copy_export
from cosmos_train.export.dcp_ranges import plan_tensor_bytes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "net.w": torch.randn(300, 70, generator=g),
        "net.t": torch.randn(40, 30, generator=g).t(),  # transposed: torch.save keeps its strides
        "net.h": torch.randn(9, generator=g).half(),
        "net.n": torch.tensor(7, dtype=torch.int64),
        "net.e": torch.zeros(0, 4),
    }


def _save(path, sd, crc32=True):
    old = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    finally:
        torch.serialization.set_crc32_options(old)
    return path


def _records(path):
    """`{record name: bytes}` of a .pt, read by zipfile (which checks every record's CRC32)."""
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


def test_plan_finds_plain_chunks_and_refuses_strided_ones(tmp_path):
    sd = _tensors()
    r = DcpSource(_save(tmp_path / "ck", sd))
    plan = plan_tensor_bytes(r.path, r.metadata, list(r.entries))
    assert plan["net.t"] is None  # not contiguous: read through dcp.load instead
    for k in ("net.w", "net.h", "net.n", "net.e"):
        (c,) = plan[k]
        data = (r.path / c.file).read_bytes()[c.offset:c.offset + c.length]
        assert data == sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert c.dst_offset == 0 and c.crc32 is not None


@pytest.mark.parametrize("mode", ["kernel", "buffered"])
@pytest.mark.parametrize("crc32", [True, False])
def test_pt_has_torch_save_records_and_crcs(tmp_path, mode, crc32):
    sd = _tensors()
    ck = _save(tmp_path / "ck", sd, crc32=crc32)
    consolidate(ck, tmp_path / "ours.pt", copy_mode=mode, progress=False)
    torch.save({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ref.pt")
    assert _records(tmp_path / "ours.pt") == _records(tmp_path / "ref.pt")
    got = torch.load(tmp_path / "ours.pt", weights_only=True, mmap=True)
    assert list(got) == list(sd)


def test_bf16_and_safetensors_shards(tmp_path):
    from safetensors.torch import load_file

    sd = _tensors()
    ck = _save(tmp_path / "ck", sd)
    consolidate(ck, tmp_path / "m.safetensors", dtype="bf16", max_shard_size=40_000, progress=False)
    got = {}
    for f in sorted(tmp_path.glob("m-*.safetensors")):
        got |= load_file(f)
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        want = v.bfloat16() if v.is_floating_point() else v
        assert torch.equal(got[k], want.contiguous()) and got[k].dtype == want.dtype, k


def test_verify_source_catches_a_flipped_byte_in_a_chunk(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "ck", sd)
    r = DcpSource(ck)
    (c,) = plan_tensor_bytes(r.path, r.metadata, ["net.w"])["net.w"]
    shard = ck / c.file
    raw = bytearray(shard.read_bytes())
    raw[c.offset + 1234] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"net\.w.*fail their CRC32 check"):
        consolidate(ck, tmp_path / "x.pt", verify_source=True, progress=False)
    assert not list(tmp_path.glob("*x.pt*"))  # nothing half-written left behind


def test_stats_say_how_bytes_went(tmp_path):
    sd = _tensors()
    ck = _save(tmp_path / "ck", sd)
    r = DcpSource(ck)
    items = [copy_export.CopyItem(e, k) for k, e in r.entries.items()]
    (tmp_path / "t").mkdir()
    stats = copy_export.CopyExportStats()
    copy_export.export(r, items, tmp_path / "t", tmp_path / "o.safetensors", mode="kernel", stats=stats)
    assert stats.loaded_bytes == sd["net.t"].nbytes  # the strided one, via dcp.load
    assert stats.kernel_bytes == sum(v.nbytes for k, v in sd.items() if k != "net.t")


def test_verify_source_records_the_crcs_of_what_it_read(tmp_path):
    import zlib

    sd = _tensors()
    ck = _save(tmp_path / "ck", sd)
    r = DcpSource(ck)
    (tmp_path / "t").mkdir()
    stats = copy_export.CopyExportStats()
    copy_export.export(r, [copy_export.CopyItem(e, k) for k, e in r.entries.items()], tmp_path / "t",
                       tmp_path / "o.pt", verify_source=True, stats=stats)
    runs = [run for rel, rs in stats.segments.items() for run in rs]
    assert len(runs) == 4  # every plain chunk; the strided tensor went through dcp.load
    for rel, rs in stats.segments.items():
        raw = (ck / rel).read_bytes()
        for start, end, crc in rs:
            assert zlib.crc32(raw[start:end]) == crc


def test_disk_full_is_a_clean_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from cosmos_train.errors import CosmosTrainError
    from cosmos_train.export import range_copy

    ck = _save(tmp_path / "ck", _tensors())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(range_copy.os, "copy_file_range", full)
    monkeypatch.setattr(range_copy.os, "pwrite", full)
    with pytest.raises(CosmosTrainError, match=r"x\.pt: no space left on the device"):
        consolidate(ck, tmp_path / "out" / "x.pt", progress=False)
    assert not list((tmp_path / "out").iterdir())
