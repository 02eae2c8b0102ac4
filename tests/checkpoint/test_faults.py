"""Fault injection: corrupted shards, hostile files, a full disk.

Each case asserts the same four things: the fault is detected, the message names the
file, nothing damaged is committed (or written as an output), and the last good
checkpoint still resumes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError, CorruptCheckpointError
from tests.checkpoint.toy import assert_same, build, full_state, spec, train_steps


def _run(tmp_path, steps=(1, 2)):
    """Two committed checkpoints; returns (checkpoints dir, the full state at each step)."""
    parts = build(0)
    ck = Checkpointer(spec(), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    states = {}
    for s in steps:
        train_steps(parts, 1)
        ck.save(s)
        states[s] = full_state(parts)
    ck.close()
    return layout.checkpoints_dir(tmp_path), states


def _fresh(tmp_path, **kw):
    parts = build(9)
    return parts, Checkpointer(spec(**kw), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                               trainer_state=parts[4], ema=parts[3])


def poison_tensor_bytes(part_dir, tensor: torch.Tensor) -> str:
    """Overwrite a tensor's stored bytes in place (same file size): what silent bit rot looks like.

    The bytes become 0x67 (~1.1e24 as float32), so a load that does not check would train on them.
    Returns the name of the shard file that was changed.
    """
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    for shard in sorted(part_dir.glob("*.distcp")):
        raw = bytearray(shard.read_bytes())
        at = raw.find(needle)
        if at > 0:
            raw[at:at + len(needle)] = b"\x67" * len(needle)
            shard.write_bytes(bytes(raw))
            return shard.name
    raise AssertionError("tensor bytes not found in any shard")


def test_silently_flipped_tensor_bytes_are_caught_on_resume_and_fall_back(tmp_path, caplog):
    ck_dir, states = _run(tmp_path)
    name = poison_tensor_bytes(ck_dir / "iter_000000002" / "model", states[2]["model"]["head.weight"])
    _, ck = _fresh(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=rf"(?s)iter_000000002.*model/{name}: crc32 mismatch"):
        ck.load()
    parts, ck = _fresh(tmp_path, fallback_to_previous=True)
    with caplog.at_level(logging.WARNING):
        assert ck.load() == 1
    assert "FALLING BACK" in caplog.text and name in caplog.text
    assert_same(states[1], full_state(parts))  # the last good checkpoint, exactly


def test_flipped_bytes_are_caught_by_consolidate_and_infer_loading(tmp_path):
    from cosmos_train.export.consolidate import consolidate
    from cosmos_train.export.load import Source, load_weights

    ck_dir, states = _run(tmp_path)
    it = ck_dir / "iter_000000002"
    name = poison_tensor_bytes(it / "model", states[2]["model"]["blocks.0.fc1.weight"])
    out = tmp_path / "model.pt"
    for kw in ({}, {"verify": True}, {"merge_lora": False, "dtype": "bf16"}):
        # the copy engine meets DCP's own per-chunk CRC first; either check names the shard file
        with pytest.raises(CorruptCheckpointError, match=rf"model/{name}: (crc32 mismatch|the bytes of)"):
            consolidate(it, out, progress=False, **kw)
        assert not out.exists() and not list(tmp_path.glob(".model.pt.partial-*"))
    with pytest.raises(CorruptCheckpointError, match=rf"model/{name}: crc32 mismatch"):
        load_weights(Source("dcp", it, str(it)), build(1)[0])
    consolidate(ck_dir / "iter_000000001", out, progress=False)  # the good one still exports
    assert torch.equal(torch.load(out, weights_only=True)["net.head.weight"], states[1]["model"]["head.weight"])


def test_optimizer_shard_corruption_is_named_too(tmp_path):
    ck_dir, states = _run(tmp_path)
    name = poison_tensor_bytes(ck_dir / "iter_000000002" / "optim", states[2]["optim"]["head.weight"]["exp_avg"])
    _, ck = _fresh(tmp_path)
    with pytest.raises(CheckpointError, match=rf"optim/{name}: crc32 mismatch"):
        ck.load()


# ------------------------------------------------------------ what start-up may delete
def test_only_our_own_leftovers_are_deleted_at_start_up(tmp_path, caplog):
    ck_dir, states = _run(tmp_path, steps=(1, 2, 3))
    (ck_dir / "iter_000000004.tmp-dead").mkdir()
    (ck_dir / "iter_000000001.deleting-123").mkdir()
    (ck_dir / "iter_000000003" / layout.COMMITTED_MARKER).unlink()  # crash between rename and marker
    (ck_dir / "iter_000000002" / layout.COMMITTED_MARKER).unlink()  # and an incomplete one:
    name = poison_tensor_bytes(ck_dir / "iter_000000002" / "model", states[2]["model"]["head.weight"])
    with caplog.at_level(logging.WARNING):
        parts, ck = _fresh(tmp_path)
    assert not (ck_dir / "iter_000000004.tmp-dead").exists() and not (ck_dir / "iter_000000001.deleting-123").exists()
    assert layout.is_committed(ck_dir / "iter_000000003")  # complete: its manifest verifies, so committed
    assert (ck_dir / "iter_000000002").is_dir() and not layout.is_committed(ck_dir / "iter_000000002")
    assert f"iter_000000002 has no COMMITTED marker and is not complete" in caplog.text and name in caplog.text
    assert ck.load() == 3
    assert_same(states[3], full_state(parts))


def test_upstream_iterations_survive_a_committed_save_beside_them(tmp_path):
    ck_dir, _ = _run(tmp_path, steps=(1, 2))
    for it in ck_dir.glob("iter_*"):  # an upstream-style run: no markers, no manifests
        (it / layout.COMMITTED_MARKER).unlink()
        (it / "MANIFEST.json").unlink()
    parts, ck = _fresh(tmp_path)
    assert ck.load() == 2  # upstream: the latest file is trusted
    train_steps(parts, 1)
    ck.save(3)
    ck.close()
    _fresh(tmp_path)[1].close()  # the next start
    assert (ck_dir / "iter_000000001").is_dir() and (ck_dir / "iter_000000002").is_dir()
    assert [s for s, _ in layout.committed_iterations(ck_dir)] == [3]


# ------------------------------------------------------------------- convert's target
def test_convert_refuses_a_committed_iteration_and_a_non_empty_dir(tmp_path):
    from typer.testing import CliRunner

    from cosmos_train.checkpoint.integrity import verify
    from cosmos_train.cli import app

    ck_dir, states = _run(tmp_path / "run", steps=(1,))
    it = ck_dir / "iter_000000001"
    torch.save({"net.head.weight": torch.zeros(3, 8)}, tmp_path / "m.pt")
    before = {p: p.read_bytes() for p in it.rglob("*") if p.is_file()}
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "m.pt"), str(it), "--no-progress"], terminal_width=300)
    assert r.exit_code == 2 and "is a committed training checkpoint" in r.output, r.output
    assert {p: p.read_bytes() for p in it.rglob("*") if p.is_file()} == before and verify(it) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "m.pt"), str(other), "--no-progress"], terminal_width=300)
    assert r.exit_code == 2 and "directory is not empty" in r.output, r.output
    parts, ck = _fresh(tmp_path / "run")
    assert ck.load() == 1  # untouched, still resumable
    # --force: the iteration stops being committed before its model part changes
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "m.pt"), str(it), "--no-progress", "--force"])
    assert r.exit_code == 0, r.output
    assert not layout.is_committed(it) and not (it / "MANIFEST.json").exists()
    assert layout.committed_iterations(ck_dir) == []


# -------------------------------------------------------------------- a missing manifest
def test_missing_manifest_in_a_committed_iteration_is_damage(tmp_path, caplog):
    from typer.testing import CliRunner

    from cosmos_train.cli import app

    ck_dir, states = _run(tmp_path)
    (ck_dir / "iter_000000002" / "MANIFEST.json").unlink()
    r = CliRunner().invoke(app, ["inspect", str(ck_dir / "iter_000000002"), "--verify"], terminal_width=300)
    assert r.exit_code == 2 and "MANIFEST.json: missing, but the iteration is committed" in r.output, r.output
    from cosmos_train.export.consolidate import consolidate

    with pytest.raises(CorruptCheckpointError, match="MANIFEST.json: missing"):
        consolidate(ck_dir / "iter_000000002", tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "m.pt").exists()
    _, ck = _fresh(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="MANIFEST.json: missing"):
        ck.load()
    parts, ck = _fresh(tmp_path, fallback_to_previous=True)
    assert ck.load() == 1
    assert_same(states[1], full_state(parts))
    r = CliRunner().invoke(app, ["inspect", str(ck_dir / "iter_000000001"), "--verify"], terminal_width=300)
    assert r.exit_code == 0 and "CRC32 of every file" in r.output, r.output


def test_inspect_says_which_checks_ran_on_an_upstream_iteration(tmp_path):
    from typer.testing import CliRunner

    from cosmos_train.cli import app

    ck_dir, _ = _run(tmp_path, steps=(1,))
    it = ck_dir / "iter_000000001"
    (it / layout.COMMITTED_MARKER).unlink()
    (it / "MANIFEST.json").unlink()
    r = CliRunner().invoke(app, ["inspect", str(it), "--verify"], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert "no manifest (upstream checkpoint)" in r.output and "CRC32" not in r.output


# --------------------------------------------------------------------------- disk full
from tests.checkpoint.small_disk import small_disk  # noqa: E402,F401  (fixture)


def test_save_on_a_full_disk_says_so_keeps_the_last_checkpoint_and_leaves_no_partial(small_disk):
    disk = small_disk(4 << 20)
    run = disk.root / "run"
    ck_dir, states = _run(run, steps=(1,))
    parts, ck = _fresh(run)
    assert ck.load() == 1
    train_steps(parts, 1)
    disk.fill(leave=8 << 10)
    with pytest.raises(CheckpointError, match=r"iter_000000002\.tmp-\w+: disk full \(ENOSPC\) while writing "
                                              r"checkpoint step 2: needs about [\d.]+ KB, .* free.*"
                                              r"\(iter_000000001\) is intact") as e:
        ck.save(2)
    assert "unexpected pos" not in str(e.value)
    ck.close()
    assert layout.partial_dirs(ck_dir) == [] and [s for s, _ in layout.committed_iterations(ck_dir)] == [1]
    parts, ck = _fresh(run)
    assert ck.load() == 1
    assert_same(states[1], full_state(parts))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_consolidate_to_a_full_disk_is_a_clean_error_without_output(small_disk, tmp_path, monkeypatch, suffix):
    from cosmos_train.export import consolidate as consolidate_mod

    ck_dir, _ = _run(tmp_path / "run", steps=(1,))
    disk = small_disk(1 << 20)
    disk.fill(leave=0)
    out = disk.root / f"model{suffix}"
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\) while writing the consolidated weights"):
        consolidate_mod.consolidate(ck_dir / "iter_000000001", out, progress=False)  # refused up front
    # and when the space runs out during the write (the up-front check passed): no abort, no output
    monkeypatch.setattr(consolidate_mod, "free_bytes", lambda p: None)
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\) while writing the consolidated weights"):
        consolidate_mod.consolidate(ck_dir / "iter_000000001", out, progress=False)
    assert [p.name for p in disk.root.iterdir() if not p.name.startswith("filler")] == []


def test_spec_on_a_full_disk_is_a_clean_error_without_temp_files(small_disk):
    from cosmos_train.errors import CosmosTrainError
    from cosmos_train.run_dir import write_spec
    from cosmos_train.spec import ExperimentSpec

    disk = small_disk(256 << 10)
    (disk.root / "run").mkdir()
    disk.fill(leave=0)
    with pytest.raises(CosmosTrainError, match=r"spec\.toml: disk full \(ENOSPC\) while writing the run's spec"):
        write_spec(ExperimentSpec(), disk.root / "run")
    assert list((disk.root / "run").iterdir()) == []


def test_resume_on_a_disk_filled_by_a_crashed_save_cleans_up_first(small_disk, tmp_path):
    from cosmos_train.train import train
    from tests.train_fixtures import small_spec

    disk = small_disk(24 << 20)
    spec = small_spec(disk.root, trainer={"max_iter": 1}, checkpoint={"save_iter": 1},
                      data={"dataset_dir": str(tmp_path / "data")})
    train(spec, show_progress=False)
    run = spec.run_dir()
    crashed = layout.checkpoints_dir(run) / "iter_000000002.tmp-dead"  # a save killed mid-write
    crashed.mkdir()
    disk.fill(leave=0, where=crashed)
    resumed = small_spec(disk.root, trainer={"max_iter": 2}, checkpoint={"save_iter": 1},
                         data={"dataset_dir": str(tmp_path / "data")})
    result = train(resumed, run_dir=run, require_checkpoint=True, show_progress=False)
    assert result.start_step == 1 and result.end_step == 2
    assert not crashed.exists() and not list(run.glob(".spec.*"))
    assert [s for s, _ in layout.committed_iterations(layout.checkpoints_dir(run))] == [1, 2]


# ---------------------------------------------------------------------- hostile files
@pytest.mark.parametrize("where", ["model_metadata", "trainer_item"])
def test_hostile_latest_checkpoint_runs_nothing_and_falls_back(tmp_path, where, caplog):
    from tests.checkpoint.hostile import hostile_metadata, hostile_trainer_part, reseal

    ck_dir, states = _run(tmp_path)
    it, marker = ck_dir / "iter_000000002", tmp_path / "PWNED"
    if where == "model_metadata":
        hostile_metadata(it / "model", marker)
    else:
        hostile_trainer_part(it, marker)
    reseal(it)  # an attacker can rewrite the manifest too: the safety must not depend on it
    _, ck = _fresh(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="refused"):
        ck.load()
    parts, ck = _fresh(tmp_path, fallback_to_previous=True)
    with caplog.at_level(logging.WARNING):
        assert ck.load() == 1
    assert "FALLING BACK" in caplog.text
    assert_same(states[1], full_state(parts))
    assert not marker.exists()
