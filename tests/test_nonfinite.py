"""A diverged run stops with a clear error; no NaN checkpoint is committed; metrics.jsonl stays JSON."""

from __future__ import annotations

import json

import pytest
import torch

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError
from cosmos_train.nonfinite import NonFiniteGuard, NonFiniteLossError
from cosmos_train.train import train
from tests.checkpoint.toy import build, spec, train_steps
from tests.train_fixtures import small_spec


def test_guard_counts_consecutive_non_finite_losses_between_checks():
    g = NonFiniteGuard(3, torch.device("cpu"))
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for x in (nan, nan, one, torch.tensor(float("inf")), nan):
        g.update(x)
    g.check(5)  # longest streak 2 < 3
    g.update(nan)  # the streak (2) carries over the check: now 3
    with pytest.raises(NonFiniteLossError, match="3\+ consecutive steps, up to step 6"):
        g.check(6)


def test_diverged_run_stops_and_metrics_stay_valid_json(tmp_path):
    s = small_spec(tmp_path, trainer={"loss_scale": 3e38, "logging_iter": 1, "max_nonfinite_steps": 2},
                   checkpoint={"save_iter": 1, "keep_last": 1})
    with pytest.raises(NonFiniteLossError, match="2\+ consecutive steps, up to step 2"):
        train(s, show_progress=False)
    lines = (s.run_dir() / "logs" / "metrics.jsonl").read_text().splitlines()

    def no_constants(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    records = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert records and records[0]["loss"] is None and "loss" in records[0]["nonfinite"]
    assert [st for st, _ in layout.committed_iterations(layout.checkpoints_dir(s.run_dir()))] == [1]


def test_checkpointer_refuses_non_finite_weights_and_keeps_the_last_finite_one(tmp_path):
    parts = build(0)
    ck = Checkpointer(spec(keep_last=1), tmp_path, model=parts[0], optimizer=parts[1], ema=parts[3])
    train_steps(parts, 1)
    ck.save(1)
    with torch.no_grad():
        parts[0].blocks[1].fc2.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: weight net\.blocks\.1\.fc2\.weight holds "
                                              r"NaN/inf .* \(iter_000000001\) is kept"):
        ck.save(2)
    ck.close()
    ck_dir = layout.checkpoints_dir(tmp_path)
    assert [st for st, _ in layout.committed_iterations(ck_dir)] == [1] and not layout.partial_dirs(ck_dir)
