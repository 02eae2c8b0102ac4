"""Each rank reads its own shards from a weights file; what cannot be located goes through rank 0."""

from __future__ import annotations

import os

import pytest
import torch

from cosmos_train.errors import CheckpointError
from cosmos_train.export import shard_read
from cosmos_train.export.safetensors_io import SafetensorsWriter
from cosmos_train.export.tensor_source import TensorEntry, open_source
from tests.dist import RankError, run_ranks


def _stored() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "uneven": torch.randn(7, 3, generator=g),  # 4 + 3 rows on 2 ranks
        "few": torch.randn(1, 5, generator=g),  # rank 1's shard is empty
        "vec": torch.randn(10, generator=g),
        "scalar": torch.tensor(2.5),
        "wide": torch.randn(6, 4, generator=g).t(),  # a strided .pt view: not locatable, broadcast
        "to_bf16": torch.randn(8, 2, generator=g),  # stored fp32, loaded into bf16: staged and cast
    }


def _write(path, sd):
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        sd = {k: v.contiguous() for k, v in sd.items()}
        w = SafetensorsWriter(path, [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in sd.items()])
        for k, v in sd.items():
            w.write(k, v)
        w.close()


def _targets(sd, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for k, v in sd.items():
        dtype = torch.bfloat16 if k == "to_bf16" else v.dtype
        zeros = torch.zeros(v.shape, dtype=dtype)
        out[k] = distribute_tensor(zeros, mesh, [Shard(0)] if v.ndim else [Replicate()])
    return out


def _load_on_ranks(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    from cosmos_train.export.load import _read_file

    sd = _stored()
    targets = _targets(sd, init_device_mesh("cpu", (world,)))
    reader = open_source(path) if rank == 0 else None
    broadcast = _read_file(targets, {k: k for k in sd}, reader, multi=True)
    return broadcast, {k: v.full_tensor() for k, v in targets.items()}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_two_ranks_get_their_shards_from_the_file(tmp_path, suffix):
    sd = _stored()
    _write(tmp_path / f"w{suffix}", sd)
    for broadcast, got in run_ranks(_load_on_ranks, 2, tmp_path / f"w{suffix}", timeout=120):
        assert broadcast == (["wide"] if suffix == ".pt" else [])  # the rest was read by each rank itself
        for k, v in sd.items():
            want = v.to(torch.bfloat16) if k == "to_bf16" else v
            assert torch.equal(got[k], want), k


def test_located_spans_and_the_rest(tmp_path):
    sd = _stored()
    _write(tmp_path / "w.pt", sd)
    found = shard_read.spans(open_source(tmp_path / "w.pt"), list(sd))
    assert set(found) == set(sd) - {"wide"}  # the transposed view is left to the broadcast path
    raw = (tmp_path / "w.pt").read_bytes()
    for k, s in found.items():
        assert raw[s.offset:s.offset + s.nbytes] == sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_a_changed_or_missing_file_is_not_the_same_file(tmp_path):
    f = tmp_path / "w.safetensors"
    _write(f, {"a": torch.ones(4)})
    ids = shard_read.file_ids(shard_read.spans(open_source(f), ["a"]))
    assert shard_read.sees_same_files(ids)
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten since rank 0 looked
    assert not shard_read.sees_same_files(ids)
    f.unlink()
    assert not shard_read.sees_same_files(ids)


def _truncated_on_ranks(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    from cosmos_train.export.load import _read_file

    targets = _targets({"big": torch.zeros(64, 64)}, init_device_mesh("cpu", (world,)))
    reader = open_source(path) if rank == 0 else None
    if rank == 0:
        os.truncate(path, os.path.getsize(path) - 1000)  # after rank 0 planned: rank 1's rows are gone
    try:
        _read_file(targets, {"big": "big"}, reader, multi=True)
    except CheckpointError as e:
        return str(e)
    return None


def test_a_read_failing_on_one_rank_fails_on_every_rank(tmp_path):
    f = tmp_path / "w.safetensors"
    _write(f, {"big": torch.randn(64, 64)})
    try:
        errors = run_ranks(_truncated_on_ranks, 2, f, timeout=120)
    except RankError as e:  # not expected: both ranks must get the CheckpointError
        raise AssertionError(str(e)) from None
    for e in errors:
        assert e is not None and "truncated" in e and str(f) in e, e
    assert errors[0].startswith("rank 1: ")  # rank 0's own reads were fine: it reports rank 1's failure
