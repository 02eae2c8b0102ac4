"""`resume RUN key=value`: optimizer overrides take effect over the restored state, spec.toml says what
trains, and a seed change (which the checkpoint would silently override) is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.optim import LambdaLinear
from cosmos_train.spec_loading import load_spec
from cosmos_train.train import train
from tests.train_fixtures import metrics, small_spec


def test_resume_overrides_take_effect_and_spec_toml_matches(tmp_path):
    spec = small_spec(tmp_path, trainer={"max_iter": 3}, checkpoint={"save_iter": 3})
    train(spec, show_progress=False)
    run = spec.run_dir()
    r = CliRunner().invoke(app, ["resume", str(run), "optimizer.lr=1e-4", "optimizer.weight_decay=0.0",
                                 "trainer.max_iter=4", "trainer.logging_iter=1"])
    assert r.exit_code == 0, r.output
    saved = load_spec(run / "spec.toml")
    assert saved.optimizer.lr == 1e-4 and saved.optimizer.weight_decay == 0.0
    step4 = [m for m in metrics(run) if m["kind"] == "train" and m["step"] == 4][-1]
    assert step4["lr"] == pytest.approx(1e-4 * LambdaLinear(saved.scheduler)(3), rel=1e-12)  # not 1e-3 x f(3)


def test_seed_change_on_a_run_with_checkpoints_is_refused(tmp_path):
    spec = small_spec(tmp_path, trainer={"max_iter": 1}, checkpoint={"save_iter": 1})
    train(spec, show_progress=False)
    r = CliRunner().invoke(app, ["resume", str(spec.run_dir()), "job.seed=7"])
    assert r.exit_code == 2 and "job.seed: fixed once a run has checkpoints" in r.output, r.output
    assert load_spec(spec.run_dir() / "spec.toml").job.seed == spec.job.seed
