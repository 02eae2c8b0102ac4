"""The one-line plan summary a run logs at start."""

import logging

import torch

from cosmos_train.plan.startup import startup_plan
from cosmos_train.spec_loading import load_spec


def test_startup_plan_summary_and_muted_build_logs(caplog):
    spec = load_spec("examples/tiny.toml", ['trainer.device="cpu"', 'model.train_architecture="lora"'])
    with caplog.at_level(logging.INFO, logger="cosmos_train"):
        p = startup_plan(spec, world=1, local_ranks=1, device=torch.device("cpu"))
    assert p.fits and p.saved_other_ac == 0
    line = p.summary()
    assert line.startswith("plan: fits — peak ") and "per rank" in line and "checkpoint" in line
    assert not [r for r in caplog.records if "attention backend" in r.getMessage()]  # the meta build is quiet


def test_log_startup_plan_warns_when_the_plan_does_not_fit(monkeypatch, caplog):
    from cosmos_train.plan import startup

    spec = load_spec("examples/tiny.toml", ['trainer.device="cpu"'])
    monkeypatch.setattr(startup, "device_memory", lambda device, local_ranks: 1 << 20)  # a 1 MiB "device"
    with caplog.at_level(logging.INFO, logger="cosmos_train"):
        p = startup.log_startup_plan(spec, world=1, device=torch.device("cpu"))
    assert p is not None and p.verdict == "does not fit"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("plan: does not fit") and "likely to run out of memory" in m for m in warnings)


def test_a_run_logs_the_plan_summary(tmp_path, caplog):
    from cosmos_train.train import train

    spec = load_spec("examples/tiny.toml", ['trainer.device="cpu"', "trainer.max_iter=1", "data.validation_clips=0",
                                            "trainer.validation_iter=0", f'job.output_root="{tmp_path}"'])
    with caplog.at_level(logging.INFO, logger="cosmos_train"):
        train(spec, show_progress=False)
    assert any(r.getMessage().startswith("plan: fits — peak") for r in caplog.records)
