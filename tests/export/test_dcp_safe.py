"""No code from a checkpoint runs: restricted `.metadata` unpickling and weights-only byte items.

The allow-list is checked against torch's own metadata of every part the toolkit writes
(a real training run, and FSDP-sharded toy parts on 2 ranks), so it cannot drift from torch.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cosmos_train import layout
from cosmos_train.export.dcp_safe import _DCP_CLASSES, MetadataUnpickler, read_metadata_file
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.cli.inspect import inspect
from cosmos_train.errors import CheckpointError
from cosmos_train.train import train
from tests.checkpoint.hostile import hostile_metadata, hostile_trainer_part, reseal
from tests.checkpoint.toy import build, spec, train_steps
from tests.dist import run_ranks
from tests.train_fixtures import small_spec

app = typer.Typer()
app.command()(inspect)
app.command("noop")(lambda: None)


class _Recorder(pickle.Unpickler):
    """A plain unpickler that records every global the stream asks for."""

    seen: set

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def _globals_and_equal(meta: Path) -> set:
    rec = _Recorder(open(meta, "rb"))
    rec.seen = set()
    plain = rec.load()
    safe = MetadataUnpickler(open(meta, "rb")).load()
    assert safe == plain, meta
    return rec.seen


def _allowed(module, name) -> bool:
    import torch

    return name in _DCP_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name), torch.dtype))


def _save_sharded(rank, world, root):
    parts = build(0, shard=True)
    train_steps(parts, 1)
    ck = Checkpointer(spec(), root, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    ck.save(1)
    ck.close()


def test_allow_list_covers_torch_metadata_of_every_part_we_write(tmp_path):
    run = train(small_spec(tmp_path, trainer={"max_iter": 1}, checkpoint={"save_iter": 1}),
                show_progress=False).run_dir
    run_ranks(_save_sharded, 2, str(tmp_path / "sharded"), timeout=120)
    metas = sorted(run.rglob(".metadata")) + sorted((tmp_path / "sharded").rglob(".metadata"))
    parts = {m.parent.name for m in metas}
    assert parts == set(layout.PARTS) and len(metas) == 8
    seen = set().union(*(_globals_and_equal(m) for m in metas))
    assert all(_allowed(*g) for g in seen), sorted(g for g in seen if not _allowed(*g))
    # and the allow-list is not wider than what torch uses (except aliases of the same kinds)
    assert {m for m, _ in seen} >= {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}


def _committed_run(tmp_path: Path) -> Path:
    parts = build(0)
    ck = Checkpointer(spec(), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    train_steps(parts, 1)
    ck.save(1)
    ck.close()
    return layout.checkpoints_dir(tmp_path) / "iter_000000001"


def _fresh(run: Path, **kw):
    parts = build(5)
    return Checkpointer(spec(**kw), run, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                        trainer_state=parts[4], ema=parts[3])


def test_hostile_metadata_is_refused_everywhere_and_runs_nothing(tmp_path):
    from cosmos_train.export.consolidate import consolidate
    from cosmos_train.export.load import Source, load_weights

    it = _committed_run(tmp_path / "run")
    marker = tmp_path / "PWNED"
    hostile_metadata(it / "model", marker)
    reseal(it)
    with pytest.raises(CheckpointError, match=r"model/\.metadata: refused: global builtins\.exec"):
        read_metadata_file(it / "model" / ".metadata")
    with pytest.raises(CheckpointError, match=r"model/\.metadata"):
        _fresh(tmp_path / "run").load()
    with pytest.raises(CheckpointError, match=r"model/\.metadata"):
        _fresh(tmp_path / "other", load_path=str(it)).initialize()
    with pytest.raises(CheckpointError, match=r"model/\.metadata"):
        consolidate(it, tmp_path / "out.pt", progress=False)
    with pytest.raises(CheckpointError, match=r"model/\.metadata"):
        load_weights(Source("dcp", it, str(it)), build(1)[0])
    r = CliRunner().invoke(app, ["inspect", str(it), "--verify"], terminal_width=200)
    assert r.exit_code == 2 and "refused" in r.output, r.output
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_hostile_byte_item_in_trainer_part_is_refused_on_resume(tmp_path):
    it = _committed_run(tmp_path / "run")
    marker = tmp_path / "PWNED"
    hostile_trainer_part(it, marker)
    reseal(it)
    with pytest.raises(CheckpointError, match=r"trainer: item 'step' refused") as e:
        _fresh(tmp_path / "run").load()
    assert "weights_only=False" not in str(e.value)
    assert not marker.exists()
