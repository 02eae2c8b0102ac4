"""Control files (spec.toml, COMMITTED, MANIFEST.json, latest_checkpoint.txt) follow the umask like the shards."""

from __future__ import annotations

import os
import stat

import pytest

from cosmos_train import layout
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.run_dir import write_spec
from cosmos_train.spec import ExperimentSpec
from tests.checkpoint.toy import build, spec


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_control_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        parts = build(0)
        ck = Checkpointer(spec(), tmp_path, model=parts[0], ema=parts[3])
        ck.save(1, force=True)
        ck.close()
        write_spec(ExperimentSpec(), tmp_path)
    finally:
        os.umask(old)
    it = layout.checkpoints_dir(tmp_path) / "iter_000000001"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    want = 0o666 & ~umask
    assert mode(it / "model" / "__0_0.distcp") == want
    for f in (it / "COMMITTED", it / "MANIFEST.json", it.parent / layout.LATEST_FILE, tmp_path / "spec.toml"):
        assert mode(f) == want, f"{f.name}: {oct(mode(f))} != {oct(want)}"
