"""The one-line plan summary a run logs at start."""

import logging

import torch

from cosmos_train.plan.startup import startup_plan
from cosmos_train.spec import load_spec


def test_startup_plan_summary_and_muted_build_logs(caplog):
    spec = load_spec("examples/tiny.toml", ['trainer.device="cpu"', 'model.train_architecture="lora"'])
    with caplog.at_level(logging.INFO, logger="cosmos_train"):
        p = startup_plan(spec, world=1, local_ranks=1, device=torch.device("cpu"))
    assert p.fits and p.saved_other_ac == 0
    line = p.summary()
    assert line.startswith("plan: fits — peak ") and "per rank" in line and "checkpoint" in line
    assert not [r for r in caplog.records if "attention backend" in r.getMessage()]  # the meta build is quiet
