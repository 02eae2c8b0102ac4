"""The `consolidate` and `convert` commands through Typer's CliRunner."""

from __future__ import annotations

import torch
import typer
from typer.testing import CliRunner

from cosmos_train.cli.consolidate import consolidate, convert
from tests.export.consolidate_fixtures import bitwise_equal


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(consolidate)
    app.command()(convert)
    return app


def test_convert_then_consolidate_via_cli(tmp_path):
    sd = {"net.w": torch.randn(4, 3), "net.n": torch.tensor(3), "net_ema.w": torch.randn(4, 3),
          "net_ema.n": torch.tensor(3)}
    torch.save(sd, tmp_path / "in.pt")
    runner = CliRunner()
    app = _app()
    it = tmp_path / "checkpoints" / "iter_000000005"
    r = runner.invoke(app, ["convert", str(tmp_path / "in.pt"), str(it), "--to", "dcp", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "4 tensors" in r.output
    r = runner.invoke(app, ["consolidate", str(it), "-o", str(tmp_path / "out.safetensors"), "--ema",
                            "--dtype", "bf16", "--verify", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "2 tensors" in r.output and "verified" in r.output
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out.safetensors")
    assert bitwise_equal(got["net.w"], sd["net_ema.w"].bfloat16()) and bitwise_equal(got["net.n"], sd["net.n"])


def test_cli_errors_exit_2_with_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(_app(), ["consolidate", str(tmp_path / "nope"), "--no-progress"])
    assert r.exit_code == 2
    assert "error:" in r.output and "no such file or directory" in r.output
    r = runner.invoke(_app(), ["consolidate", str(tmp_path), "--dtype", "fp8"])
    assert r.exit_code == 2  # rejected by the option's choices


def test_help_shows_default_output():
    r = CliRunner().invoke(_app(), ["consolidate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "RUN_DIR/consolidated/iter_XXXXXXXXX" in r.output
