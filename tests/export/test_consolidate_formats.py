"""The streaming writers/readers behind consolidation: .pt (torch's zip writer) and .safetensors."""

from __future__ import annotations

import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosmos_train.errors import CheckpointError
from cosmos_train.export.dcp_source import group_by_bytes
from cosmos_train.export.pt_io import PtSource, PtWriter
from cosmos_train.export.safetensors_io import SafetensorsWriter, parse_size, plan_shards
from cosmos_train.export.tensor_source import TensorEntry, open_source
from tests.export.consolidate_fixtures import bitwise_equal


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "net.a": torch.randn(3, 4, generator=g),
        "net.view": base[1:4, ::2],  # non-contiguous view into a larger storage
        "net.bf16": torch.randn(5, generator=g).bfloat16(),
        "net.fp16": torch.randn(2, 2, generator=g).half(),
        "net.scalar": torch.tensor(0.5),
        "net.count": torch.tensor(7, dtype=torch.int64),
        "net.empty": torch.zeros(0, 3),
        "net.mask": torch.tensor([True, False, True]),
        "net.u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),  # a "new" dtype: torch pickles it v3
    }


def _write_pt(path, sd):
    with PtWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]) as w:
        for k, v in sd.items():
            w.write(k, v)


def test_pt_writer_loads_like_torch_save(tmp_path):
    sd = _tensors()
    _write_pt(tmp_path / "ours.pt", sd)
    torch.save({k: v.contiguous().clone() for k, v in sd.items()}, tmp_path / "ref.pt")
    for mmap in (False, True):
        got = torch.load(tmp_path / "ours.pt", weights_only=True, mmap=mmap)
        assert list(got) == list(sd)
        for k in sd:
            assert bitwise_equal(got[k], sd[k].contiguous()), k
    # Same records, same pickle as torch.save (only the archive folder name and random id differ).
    ours, ref = zipfile.ZipFile(tmp_path / "ours.pt"), zipfile.ZipFile(tmp_path / "ref.pt")
    strip = lambda z: [n.split("/", 1)[1] for n in z.namelist()]  # noqa: E731
    assert strip(ours) == strip(ref)
    top = lambda z: z.namelist()[0].split("/", 1)[0]  # noqa: E731  ("archive": written through a file object)
    for name in strip(ref):
        if name != ".data/serialization_id":
            assert ours.read(f"{top(ours)}/{name}") == ref.read(f"{top(ref)}/{name}"), name


def test_pt_writer_rejects_out_of_order_and_missing(tmp_path):
    sd = _tensors()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = PtWriter(tmp_path / "x.pt", entries)
    with pytest.raises(ValueError, match="expected net.a"):
        w.write("net.view", sd["net.view"])
    w.write("net.a", sd["net.a"])
    with pytest.raises(ValueError, match="8 tensors not written"):
        w.close()


def test_pt_reader_reads_one_tensor_at_a_time(tmp_path):
    sd = _tensors()
    torch.save({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ref.pt")
    r = open_source(tmp_path / "ref.pt")
    assert isinstance(r, PtSource) and list(r.entries) == list(sd)
    for k in sd:
        assert bitwise_equal(r.load([k])[k], sd[k].contiguous()), k
    # A torch.save'd dict whose tensors share one storage (views) reads back correctly too.
    base = torch.arange(12.0)
    torch.save({"x": base[2:5], "y": base.view(3, 4)[:, 1]}, tmp_path / "views.pt")
    r = open_source(tmp_path / "views.pt")
    assert torch.equal(r.load(["x"])["x"], base[2:5]) and torch.equal(r.load(["y"])["y"], base.view(3, 4)[:, 1])
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ref.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable torch \.pt file"):
        open_source(tmp_path / "cut.pt")


def test_safetensors_writer_matches_library(tmp_path):
    sd = _tensors()
    entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = SafetensorsWriter(tmp_path / "ours.safetensors", entries, metadata={"format": "pt"})
    for k, v in sd.items():
        w.write(k, v)
    w.close()
    got = load_file(tmp_path / "ours.safetensors")
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert bitwise_equal(got[k], sd[k].contiguous()), k
    raw = (tmp_path / "ours.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
    # Our reader reads files written by the library.
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "lib.safetensors")
    r = open_source(tmp_path / "lib.safetensors")
    for k in sd:
        assert bitwise_equal(r.load([k])[k], sd[k].contiguous()), k
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 4])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        open_source(tmp_path / "cut.safetensors")


def test_sizes_shards_and_groups():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("5 parsecs")
    ents = [TensorEntry(str(i), torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]  # bytes 40 40 120 20 20
    assert [[e.name for e in s] for s in plan_shards(ents, 80)] == [["0", "1"], ["2"], ["3", "4"]]
    assert [[e.name for e in g] for g in group_by_bytes(ents, 100)] == [["0", "1"], ["2"], ["3", "4"]]
    assert all(sum(e.nbytes for e in g) <= 100 or len(g) == 1 for g in group_by_bytes(ents, 100))
