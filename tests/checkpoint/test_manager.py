"""Checkpointer save/load on real DCP files: round trip, resharding 2->1, 2->4, 1->2, async modes, errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError
from tests.checkpoint.toy import assert_same, build, full_state, pack, spec, train_steps, unpack
from tests.dist import run_ranks

MODES = ("off", "async", "async_pinned")


class FailingWriter(FileSystemWriter):
    """A storage writer whose data write raises: an injected disk error."""

    def write_data(self, plan, planner):
        raise OSError(28, "No space left on device (injected)")


def _save_on_ranks(rank, world, root):
    """Train 3 steps, save at 3 in every mode, train 2 more; return reference states."""
    parts = build(0, shard=True)
    train_steps(parts, 3)
    at_save = full_state(parts)
    for mode in MODES:
        ck = Checkpointer(spec(async_mode=mode, save_iter=3), f"{root}/{mode}", model=parts[0],
                          optimizer=parts[1], scheduler=parts[2], trainer_state=parts[4], ema=parts[3])
        assert not ck.save(2)  # not a multiple of save_iter
        assert ck.save(3)
        assert not ck.save(3, force=True)  # already saved at this step (e.g. the final forced save)
        ck.close()
    losses_after = train_steps(parts, 2)
    # An error injected on rank 1 only surfaces on both ranks, and latest stays at 3.
    factory = (lambda p: FailingWriter(p)) if rank == 1 else None
    ck = Checkpointer(spec(async_mode="async"), f"{root}/async", model=parts[0], optimizer=parts[1],
                      scheduler=parts[2], trainer_state=parts[4], ema=parts[3], writer_factory=factory)
    assert ck.save(5)  # returns at once; the error comes at the next call
    raised = None
    try:
        ck.wait()
    except CheckpointError as e:
        raised = str(e)
    ck.close()
    final = full_state(parts)
    # Exact resume at the same world size: a fresh model loads step 3 and repeats steps 4, 5.
    again = build(99, shard=True)
    ck = Checkpointer(spec(), f"{root}/off", model=again[0], optimizer=again[1], scheduler=again[2],
                      trainer_state=again[4], ema=again[3])
    assert ck.load() == 3
    ck.close()
    resumed = (train_steps(again, 2), full_state(again))
    return pack((at_save, losses_after, final, raised, resumed))


def _load_on_ranks(rank, world, root, mode, pt_path=None):
    pt_model = None
    if pt_path:  # a full .pt read by rank 0 only and broadcast onto the FSDP shards
        pt_parts = build(6, shard=True)
        Checkpointer(spec(load_path=pt_path), f"{root}/pt_run", model=pt_parts[0], ema=pt_parts[3]).initialize()
        pt_model = full_state(pt_parts)
    parts = build(123, shard=True)  # different init: everything must come from the checkpoint
    ck = Checkpointer(spec(), f"{root}/{mode}", model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    step = ck.load()
    ck.close()
    loaded = full_state(parts)
    gen_state = parts[4].generator.get_state()
    losses = train_steps(parts, 2)
    return pack((step, loaded, losses, full_state(parts), gen_state, parts[4].reseeded, pt_model))


def _load_plain(root, mode):
    parts = build(123)
    ck = Checkpointer(spec(), f"{root}/{mode}", model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    step = ck.load()
    return parts, step, full_state(parts)


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks2")
    return root, [unpack(r) for r in run_ranks(_save_on_ranks, 2, str(root), timeout=180)]


def test_save_commits_layout_and_error_surfaces_on_every_rank(saved2):
    root, results = saved2
    for mode in MODES:
        ck_dir = layout.checkpoints_dir(root / mode)
        assert layout.read_latest_file(ck_dir) == "iter_000000003"
        it = ck_dir / "iter_000000003"
        assert layout.is_committed(it) and (it / "MANIFEST.json").is_file()
        assert {p.name for p in it.iterdir() if p.is_dir()} == {"model", "optim", "scheduler", "trainer"}
    for rank in (0, 1):
        raised = results[rank][3]
        losses, state = results[rank][4]
        assert losses == results[rank][1]  # bit-identical losses after resume on 2 ranks
        assert_same(results[rank][2], state, f"resumed rank {rank}")
        assert raised is not None and "step 5" in raised and "injected" in raised, raised
    assert layout.read_latest(layout.checkpoints_dir(root / "async")).name == "iter_000000003"


def test_async_modes_write_the_same_tensors_as_sync(saved2, tmp_path):
    root, _ = saved2
    contents = {}
    for mode in MODES:
        it = root / mode / "checkpoints" / "iter_000000003"
        contents[mode] = {}
        for part in ("model", "optim", "scheduler", "trainer"):
            dcp_to_torch_save(it / part, tmp_path / f"{mode}_{part}.pt")
            contents[mode][part] = torch.load(tmp_path / f"{mode}_{part}.pt", weights_only=False)
    assert any(k.startswith("net_ema.") for k in contents["off"]["model"])
    for mode in MODES[1:]:
        assert_same(contents["off"], contents[mode], mode)


def test_resume_on_one_process_matches_the_uninterrupted_run(saved2):
    root, results = saved2
    at_save, losses_after, final, *_ = results[0]
    for mode in MODES:
        parts, step, loaded = _load_plain(root, mode)
        assert step == 3
        assert_same(at_save, loaded, f"2->1 {mode}")
        if mode == "off":
            # Rank 0's RNG is restored, so the next step sees the same noise and gives the same loss
            # (later steps differ in the last bits: gradient reduction order depends on world size).
            assert train_steps(parts, 1)[0] == losses_after[0]


def test_resume_on_four_ranks(saved2):
    root, results = saved2
    at_save, losses_after, *_ = results[0]
    out = [unpack(r) for r in run_ranks(_load_on_ranks, 4, str(root), "async_pinned", timeout=240)]
    for rank, (step, loaded, losses, after, gen, reseeded, _) in enumerate(out):
        assert step == 3
        assert_same(at_save, loaded, f"2->4 rank {rank}")
        assert reseeded == (rank >= 2)  # ranks 2, 3 have no saved RNG entry
    assert out[0][2][0] == losses_after[0]  # rank 0's generator continues the saved stream


def _save_plain(root):
    parts = build(7)
    train_steps(parts, 2)
    ck = Checkpointer(spec(async_mode="async"), f"{root}/one", model=parts[0], optimizer=parts[1],
                      scheduler=parts[2], trainer_state=parts[4], ema=parts[3])
    ck.save(2)
    ck.close()
    return full_state(parts)


def test_saved_on_one_resumes_on_two_and_pt_loads_sharded(tmp_path):
    at_save = _save_plain(tmp_path)
    src = build(0)
    flat = {f"net.{k}": v for k, v in src[0].state_dict().items()}
    flat.update({f"net_ema.{k}": v + 1 if v.is_floating_point() else v for k, v in src[0].state_dict().items()})
    torch.save(flat, tmp_path / "m.pt")
    out = [unpack(r) for r in run_ranks(_load_on_ranks, 2, str(tmp_path), "one", str(tmp_path / "m.pt"),
                                        timeout=180)]
    for rank_out in out:
        pt_state = rank_out[6]
        for k in src[0].state_dict():
            assert torch.equal(pt_state["model"][k], flat[f"net.{k}"]), k
            assert torch.equal(pt_state["ema"][k], flat[f"net_ema.{k}"]), k
    for rank, (step, loaded, *_rest) in enumerate(out):
        assert step == 2
        assert_same(at_save, loaded, f"1->2 rank {rank}")
    assert out[1][5] is True and out[0][5] is False


def test_sync_write_error_raises_and_keeps_previous(tmp_path, caplog):
    parts = build(1)
    ck = Checkpointer(spec(), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4])
    ck.save(1)
    ck._writer_factory = lambda p: FailingWriter(p)
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\) while writing checkpoint step 2.*"
                                              r"iter_000000001\) is intact.*injected"):
        ck.save(2)
    # the half-written dir is removed at once (it is ours; on a full disk it holds the space)
    assert layout.partial_dirs(layout.checkpoints_dir(tmp_path)) == []
    ck.close()
    assert layout.read_latest(layout.checkpoints_dir(tmp_path)).name == "iter_000000001"
    # a leftover of a crashed save is reported and removed by the next Checkpointer
    (layout.checkpoints_dir(tmp_path) / "iter_000000002.tmp-dead").mkdir()
    with caplog.at_level(logging.WARNING):
        Checkpointer(spec(), tmp_path, model=parts[0]).close()
    assert "partial" in caplog.text
    assert layout.partial_dirs(layout.checkpoints_dir(tmp_path)) == []


def test_async_error_surfaces_at_check_and_save(tmp_path):
    parts = build(1)
    ck = Checkpointer(spec(async_mode="async_pinned"), tmp_path, model=parts[0], optimizer=parts[1],
                      writer_factory=lambda p: FailingWriter(p))
    assert ck.save(1)
    ck._saver.future.exception()  # let the background save finish (and fail)
    with pytest.raises(CheckpointError, match="injected"):
        ck.check()
    assert ck.save(2)
    with pytest.raises(CheckpointError, match="step 2"):
        ck.save(3)
    ck.close()
    assert layout.read_latest(layout.checkpoints_dir(tmp_path)) is None


def test_retention_keep_last_and_keep_every(tmp_path):
    parts = build(2)
    ck = Checkpointer(spec(async_mode="async", keep_last=2, keep_every=3), tmp_path, model=parts[0])
    for step in range(1, 8):
        ck.save(step)
    ck.close()
    steps = [s for s, _ in layout.committed_iterations(layout.checkpoints_dir(tmp_path))]
    assert steps == [3, 6, 7] or steps == [3, 6, 7]  # 6 and 7 newest; 3 a milestone
    assert layout.read_latest_file(layout.checkpoints_dir(tmp_path)) == "iter_000000007"


def test_exact_resume_single_process(tmp_path):
    ref = build(4)
    train_steps(ref, 2)
    ck = Checkpointer(spec(async_mode="async_pinned"), tmp_path, model=ref[0], optimizer=ref[1],
                      scheduler=ref[2], trainer_state=ref[4], ema=ref[3])
    ck.save(2)
    ck.close()
    ref_losses = train_steps(ref, 3)
    res = build(5)
    ck = Checkpointer(spec(), tmp_path, model=res[0], optimizer=res[1], scheduler=res[2], trainer_state=res[4],
                      ema=res[3])
    assert ck.resume_or_initialize() == 2
    assert train_steps(res, 3) == ref_losses
    assert_same(full_state(ref), full_state(res))
