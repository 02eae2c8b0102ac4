"""EMA in the loop as upstream: the first update passes iteration 0 (beta = 0, a copy).

Upstream `imaginaire/trainer.py` calls `on_before_zero_grad(..., iteration=iteration)` before
`iteration += 1`, and `Predict2Video2WorldModel.ema_beta(0)` is 0.
"""

from __future__ import annotations

import torch

from cosmos_train.layout import checkpoints_dir, read_latest
from cosmos_train.models.ema import ema_beta, gamma_from_s
from cosmos_train.train import train
from tests.train_fixtures import read_dcp, small_spec


def test_first_ema_update_copies_then_second_follows_beta_1(tmp_path):
    one = train(small_spec(tmp_path, name="one", trainer={"max_iter": 1}), show_progress=False)
    sd = read_dcp(read_latest(checkpoints_dir(one.run_dir)) / "model", tmp_path / "a")
    reg = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    for key, value in reg.items():
        assert torch.equal(sd[f"net_ema.{key}"], value), key  # beta(0) = 0: the EMA is the weights

    two = train(small_spec(tmp_path, name="one", trainer={"max_iter": 2}), show_progress=False)
    sd2 = read_dcp(read_latest(checkpoints_dir(two.run_dir)) / "model", tmp_path / "b")
    key = "blocks.0.mlp.layer1.weight"
    beta = (1 - 1 / 2) ** (gamma_from_s(0.1) + 1)  # upstream: (1 - 1/(it+1))^(gamma+1) at it = 1
    assert ema_beta(1, gamma_from_s(0.1)) == beta
    expected = beta * reg[key] + (1 - beta) * sd2[f"net.{key}"]
    torch.testing.assert_close(sd2[f"net_ema.{key}"], expected, rtol=1e-6, atol=1e-7)
