"""Manifest, verify, damaged shards (missing, truncated, corrupt) and fallback_to_previous."""

from __future__ import annotations

import logging

import pytest

from cosmos_train import layout
from cosmos_train.checkpoint.integrity import MANIFEST_FILE, read_manifest, verify
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError
from tests.checkpoint.toy import build, spec, train_steps


def _run(tmp_path, steps=(1, 2)):
    parts = build(0)
    ck = Checkpointer(spec(), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    for s in steps:
        train_steps(parts, 1)
        ck.save(s)
    ck.close()
    return layout.checkpoints_dir(tmp_path)


def _fresh(tmp_path, **kw):
    parts = build(9)
    return parts, Checkpointer(spec(**kw), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                               trainer_state=parts[4], ema=parts[3])


def test_manifest_lists_every_file_and_verify_is_clean(tmp_path):
    ck_dir = _run(tmp_path)
    it = ck_dir / "iter_000000002"
    man = read_manifest(it)
    assert man["step"] == 2 and man["algorithm"] == "crc32"
    on_disk = sorted(str(p.relative_to(it)) for p in it.rglob("*") if p.is_file()
                     and p.name not in (MANIFEST_FILE, layout.COMMITTED_MARKER))
    assert sorted(man["files"]) == on_disk and "model/.metadata" in on_disk
    assert verify(it) == []


@pytest.mark.parametrize("damage", ["truncate", "delete", "corrupt", "metadata"])
def test_damaged_latest_fails_naming_iteration_and_file(tmp_path, damage):
    ck_dir = _run(tmp_path)
    it = ck_dir / "iter_000000002"
    shard = it / "model" / "__0_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete":
        shard.unlink()
    elif damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (it / "model" / ".metadata").write_bytes(b"not a pickle")
    problems = verify(it)
    assert problems and all("iter_000000002" in p for p in problems)
    name = ".metadata" if damage == "metadata" else "__0_0.distcp"
    assert any(name in p for p in problems), problems
    if damage == "corrupt":  # same size: the CRCs taken while loading see it
        assert any("crc32 mismatch" in p for p in problems)
    _, ck = _fresh(tmp_path)
    with pytest.raises(CheckpointError, match=r"iter_000000002[\s\S]*" + name.replace(".", r"\.")):
        ck.load()


def test_fallback_to_previous_warns_and_loads_step_1(tmp_path, caplog):
    ck_dir = _run(tmp_path)
    (ck_dir / "iter_000000002" / "optim" / "__0_0.distcp").unlink()
    parts, ck = _fresh(tmp_path, fallback_to_previous=True)
    with caplog.at_level(logging.WARNING):
        assert ck.load() == 1
    assert "FALLING BACK" in caplog.text and "iter_000000001" in caplog.text


def test_upstream_dir_without_marker_loads_when_named(tmp_path):
    ck_dir = _run(tmp_path, steps=(1,))
    it = ck_dir / "iter_000000001"
    (it / layout.COMMITTED_MARKER).unlink()
    (it / MANIFEST_FILE).unlink()
    assert layout.resolve_iteration_dir(it) == it
    assert layout.read_latest(ck_dir) == it  # no marker anywhere: an upstream run, latest file trusted
    assert verify(it) == []


def test_checksums_taken_while_writing_equal_a_second_read(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from cosmos_train.checkpoint.integrity import ChecksummingFileSystem, data_files, file_entry

    fs = ChecksummingFileSystem()
    writer = FileSystemWriter(tmp_path / "part", sync_files=True, thread_count=2)
    writer.fs = fs
    sd = {f"t{i}": torch.randn(64, 33) for i in range(6)} | {"blob": {"step": 3, "name": "x"}}
    dcp.save(sd, storage_writer=writer, no_dist=True)
    taken = fs.take(tmp_path)
    shards = [rel for rel in data_files(tmp_path) if rel.endswith(".distcp")]
    assert len(shards) == 2 and set(shards) <= set(taken)
    for rel, entry in taken.items():
        assert entry == file_entry(tmp_path, rel), rel
    assert fs.take(tmp_path) == {}  # taken once
