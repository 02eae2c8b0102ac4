"""`inspect` through a small Typer app and CliRunner."""

from __future__ import annotations

import torch
import typer
from typer.testing import CliRunner

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.cli.inspect import inspect
from tests.checkpoint.toy import build, spec, train_steps

app = typer.Typer()
app.command()(inspect)
app.command("noop")(lambda: None)  # two commands, so `inspect` is a named subcommand as in the real CLI


def test_inspect_lists_iterations_tensors_and_verifies(tmp_path):
    parts = build(0)
    ck = Checkpointer(spec(), tmp_path, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    for s in (1, 2):
        train_steps(parts, 1)
        ck.save(s)
    ck.close()
    ck_dir = layout.checkpoints_dir(tmp_path)
    (ck_dir / "iter_000000003.tmp-dead").mkdir()
    r = CliRunner().invoke(app, ["inspect", str(tmp_path), "--verify"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "committed" in r.output and "partial" in r.output and "iter_000000002: OK" in r.output
    r = CliRunner().invoke(app, ["inspect", str(tmp_path), "--iter", "2", "--verify"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "net.blocks.0.fc1.weight" in r.output and "net_ema.head.weight" in r.output and "16x8" in r.output
    shard = ck_dir / "iter_000000002" / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    r = CliRunner().invoke(app, ["inspect", str(ck_dir / "iter_000000002"), "--verify"], terminal_width=200)
    assert r.exit_code == 2 and "__0_0.distcp" in r.output
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_inspect_lists_a_consolidated_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"net.a.weight": torch.zeros(3, 4), "net.b": torch.ones(2, dtype=torch.bfloat16)},
              str(tmp_path / "m.safetensors"))
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.safetensors")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "net.a.weight" in r.output and "3x4" in r.output and "bfloat16" in r.output
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "bad.pt")])
    assert r.exit_code == 2 and "bad.pt" in r.output
