import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cosmos_train.cli import app

ROOT = Path(__file__).parents[2]
runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("run", "resume", "consolidate", "infer", "validate", "show", "schema", "inspect"):
        assert cmd in out, cmd


def test_validate_good_and_bad_specs(tmp_path):
    assert runner.invoke(app, ["validate", str(ROOT / "examples/2b_lora.toml")]).exit_code == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nlr = -1\n[jobb]\nname = 'x'\n")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2
    assert "optimizer.lr: Input should be greater than 0 (got -1)" in r.output
    assert "jobb: unknown key; did you mean 'job'?" in r.output
    # square brackets in messages are text, not console markup
    r = runner.invoke(app, ["validate", str(ROOT / "examples/tiny.toml"), "model.lora.rank=8"])
    assert r.exit_code == 2 and "[lora] settings given" in r.output and "remove [model.lora]" in r.output


def test_show_applies_overrides():
    r = runner.invoke(app, ["show", str(ROOT / "examples/2b_lora.toml"), "parallel.cp=4"])
    assert r.exit_code == 0, r.output
    assert "cp = 4" in r.output
    assert "1,956,413,440 parameters in 567 tensors" in r.output


def test_schema_is_json():
    r = runner.invoke(app, ["schema"])
    assert r.exit_code == 0 and json.loads(r.output)["title"] == "ExperimentSpec"


def test_run_dry_run_writes_spec_and_starts_nothing(tmp_path):
    r = runner.invoke(app, ["run", str(ROOT / "examples/tiny.toml"), f"job.output_root={json.dumps(str(tmp_path))}",
                            "--dry-run"])
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "cosmos_train" / "examples" / "tiny"
    assert (run_dir / "spec.toml").exists()
    assert not (run_dir / "checkpoints").exists()
    # the same run dir with another architecture is refused, naming the field
    r = runner.invoke(app, ["run", str(ROOT / "examples/tiny.toml"), f"job.output_root={json.dumps(str(tmp_path))}",
                            "model.architecture.num_blocks=3", "--dry-run"])
    assert r.exit_code == 2
    assert "model.architecture.num_blocks: 2 -> 3" in r.output


def test_resume_without_a_run_dir_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["resume", str(tmp_path)])
    assert r.exit_code == 2 and "spec.toml" in r.output


def test_console_script_and_module_entry_points():
    exe = Path(sys.executable).parent / "cosmos-train"
    r = subprocess.run([str(exe), "validate", str(ROOT / "examples/tiny.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "cosmos_train", "validate", str(ROOT / "examples/tiny.toml"),
                        "optimizer.lr=-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "optimizer.lr" in r.stderr
