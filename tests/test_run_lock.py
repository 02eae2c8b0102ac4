"""The run-directory lock: a second run on the same dir exits 2 naming the holder and deletes nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.run_lock import LOCK_FILE, RunLock, RunLockedError
from tests.train_fixtures import ROOT, small_spec

HOLD = ("import sys, time; from cosmos_train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)")


def _holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by pid {p.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: no stale lock
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_without_kernel_locks_the_recorded_pid_and_host_decide(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": time.time()}))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
        lock.write_text(json.dumps({"pid": 1, "host": "other-node", "since": time.time()}))
        with pytest.raises(RunLockedError, match="host other-node"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": time.time()}))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text


def test_run_on_a_locked_run_dir_exits_2_and_keeps_the_in_flight_save(tmp_path):
    spec = small_spec(tmp_path)
    run_dir = spec.run_dir()
    in_flight = run_dir / "checkpoints" / "iter_000000003.tmp-abcd"
    in_flight.mkdir(parents=True)
    (tmp_path / "s.toml").write_text(spec.to_toml())
    p = _holder(run_dir)
    try:
        r = CliRunner().invoke(app, ["run", str(tmp_path / "s.toml")])
    finally:
        p.kill()
        p.wait()
    assert r.exit_code == 2, r.output
    assert f"in use by pid {p.pid}" in r.output
    assert in_flight.is_dir()
