"""The real console entry under torchrun: 2 gloo processes, context parallel, then resume on one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cosmos_train.layout import checkpoints_dir, read_latest
from tests.train_fixtures import ROOT, metrics, small_spec


def test_torchrun_two_processes_with_cp_then_resume_single_process(tmp_path):
    spec = small_spec(tmp_path, name="tr", trainer={"max_iter": 2, "logging_iter": 1}, checkpoint={"save_iter": 2})
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(spec.to_toml())
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cosmos_train", "run", str(spec_file),
           "parallel.cp=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "applied ring context parallelism to 2 attention modules, cp=2" in r.stderr
    assert read_latest(checkpoints_dir(spec.run_dir())).name == "iter_000000002"
    assert [m["step"] for m in metrics(spec.run_dir())] == [1, 2]

    # the cp=2 checkpoint continues in one process without torchrun
    exe = Path(sys.executable).parent / "cosmos-train"
    r = subprocess.run([str(exe), "resume", str(spec.run_dir()), "trainer.max_iter=3", "parallel.cp=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_latest(checkpoints_dir(spec.run_dir())).name == "iter_000000003"
