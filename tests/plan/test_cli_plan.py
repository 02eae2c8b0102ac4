"""`cosmos-train plan` through the CLI: JSON output, verdict, fixes, bad input."""

import json
from pathlib import Path

from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.cli.plan import parse_size

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "examples/tiny.toml")
runner = CliRunner()


def _json(args):
    r = runner.invoke(app, ["plan", TINY, 'trainer.device="cpu"', *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # stdout only: log lines go to stderr


def test_plan_json_fits_and_reports_every_part():
    out = _json(["--world", "2", "--gpu-mem", "1GiB"])
    assert out["verdict"]["verdict"] == "fits" and out["verdict"]["fixes"] == []
    assert out["mesh"] == {"dp_replicate": 1, "dp_shard": 2, "cp": 1, "fsdp_shard": 2}
    pr = out["per_rank"]
    assert pr["peak"] == max(pr["phases"].values())
    assert out["verdict"]["headroom"] == (1 << 30) - pr["peak"]
    ck = out["checkpoint"]
    assert ck["total"] == ck["model"] + ck["ema"] + ck["optim"] + ck["trainer"]
    assert ck["ema"] == ck["model"]  # EMA on: net_ema mirrors net
    assert out["consolidated"]["bf16"]["model"] < out["consolidated"]["fp32"]["model"]


def test_plan_that_does_not_fit_lists_computed_fixes_that_fit():
    fits = _json([])
    peak = fits["per_rank"]["peak"]
    out = _json(["--gpu-mem", str(int(peak * 0.9))])  # 10 % short
    assert out["verdict"]["verdict"] == "does not fit"
    fixes = out["verdict"]["fixes"]
    assert fixes, out["verdict"]
    for f in fixes:
        assert f["peak_bytes"] <= 0.95 * peak * 0.9 and f["delta_bytes"] < 0
    assert any("activation_checkpointing" in f["change"] for f in fixes)


def test_plan_table_and_nodes_option():
    r = runner.invoke(app, ["plan", TINY, 'trainer.device="cpu"', "--nodes", "2", "--gpus-per-node", "2"])
    assert r.exit_code == 0, r.output
    assert "verdict" in r.output and "world 4 (2 node(s) x 2)" in r.output and "checkpoint" in r.output


def test_plan_bad_input_is_one_line_exit_2():
    r = runner.invoke(app, ["plan", TINY, "--gpu-mem", "lots"])
    assert r.exit_code == 2 and "--gpu-mem: expected a size like 80GiB" in r.output
    r = runner.invoke(app, ["plan", TINY, "--world", "3", "parallel.cp=2"])
    assert r.exit_code == 2 and "parallel:" in r.output
    r = runner.invoke(app, ["plan", TINY, "--world", "2", "--nodes", "2"])
    assert r.exit_code == 2


def test_parse_size():
    assert parse_size("80GiB") == 80 << 30
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("24 gib") == 24 << 30


def test_measure_disk_writes_and_removes_its_probe(tmp_path):
    from cosmos_train.plan.disk import measure_write_gbps

    assert measure_write_gbps(tmp_path, mib=2) > 0
    assert list(tmp_path.iterdir()) == []
