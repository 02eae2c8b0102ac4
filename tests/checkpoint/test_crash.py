"""Crash safety: SIGKILL in the middle of a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from tests.checkpoint.toy import build, spec

ROOT = Path(__file__).resolve().parents[2]
# Hooks: 0 model write, 1 model metadata, 2 optim write, ..., 7 trainer metadata; 99 never (after commit).
KILL_POINTS = [(1, "async"), (4, "off"), (7, "async"), (99, "off")]


def _wait_for(progress: Path, word: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if progress.exists() and word in progress.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"child never reached {word}")


def test_sigkill_during_save_resumes_from_previous(tmp_path):
    runs = []
    for stop_at, mode in KILL_POINTS:
        run = tmp_path / f"kill_{stop_at}_{mode}"
        run.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "tests.checkpoint.crash_child", str(run), str(stop_at), mode],
                                cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        runs.append((stop_at, run, proc))
    try:
        for stop_at, run, proc in runs:
            _wait_for(run / "progress", "DONE" if stop_at == 99 else "PAUSED", proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()
    for stop_at, run, _ in runs:
        ck_dir = layout.checkpoints_dir(run)
        expect = 2 if stop_at == 99 else 1
        if stop_at != 99:
            assert layout.partial_dirs(ck_dir), "a partial dir of the interrupted save should be left"
        parts = build(11)
        ck = Checkpointer(spec(), run, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                          trainer_state=parts[4], ema=parts[3])
        assert layout.partial_dirs(ck_dir) == []  # reported and removed at start-up
        assert ck.load() == expect, f"kill point {stop_at}"
        ck.close()
        if expect == 1:
            ref = torch.load(run / "ref_step1.pt", weights_only=True)
            for k, v in parts[0].state_dict().items():
                assert torch.equal(v, ref[k]), f"kill point {stop_at}: {k}"


@pytest.mark.parametrize("stage", ["renamed", "marked"])
def test_crash_inside_commit(tmp_path, stage):
    """Between rename and COMMITTED the new dir is complete (its manifest verifies): the next start commits
    it; between COMMITTED and the latest file it wins."""
    parts = build(2)
    ck = Checkpointer(spec(), tmp_path, model=parts[0])
    ck.save(1)
    ck.save(2)
    ck.close()
    ck_dir = layout.checkpoints_dir(tmp_path)
    layout.atomic_write_text(ck_dir / layout.LATEST_FILE, "iter_000000001\n")  # the update never happened
    if stage == "renamed":
        (ck_dir / "iter_000000002" / layout.COMMITTED_MARKER).unlink()
        assert layout.read_latest(ck_dir).name == "iter_000000001"
        Checkpointer(spec(), tmp_path, model=parts[0]).close()
        assert layout.is_committed(ck_dir / "iter_000000002")
        assert layout.read_latest_file(ck_dir) == "iter_000000002"
    else:
        assert layout.read_latest(ck_dir).name == "iter_000000002"
