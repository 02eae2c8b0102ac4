"""`infer` with bad flags or inputs: one-line errors (exit 2), no half-written output."""

from __future__ import annotations

import wave

import numpy as np
import pytest
from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.data.video import write_mp4
from cosmos_train.errors import CosmosTrainError
from cosmos_train.infer import load_embedding, read_condition_frames


@pytest.fixture
def inputs(tmp_path):
    write_mp4(tmp_path / "c.mp4", np.zeros((5, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "e.npy", np.ones((3, 1024), dtype=np.float32))
    return tmp_path


@pytest.mark.parametrize("flags, fragment", [
    (["--steps", "0"], "--steps: must be >= 1 (got 0)"),
    (["--guidance", "nan"], "--guidance: must be a finite number (got nan)"),
    (["--fps", "0"], "--fps: must be >= 1 (got 0)"),
    (["--num-frames", "12"], "--num-frames: must be 4k+1 (got 12)"),
    (["-o", "{dir}"], "is a directory; give a file name"),
    (["-i", "{dir}/missing.png"], "--input {dir}/missing.png: no such file"),
])
def test_bad_flags_fail_before_loading_anything(inputs, flags, fragment):
    flags = [f.format(dir=inputs) for f in flags]
    base = ["infer", "-c", str(inputs / "no-checkpoint-needed.pt"), "-i", str(inputs / "c.mp4"),
            "-p", str(inputs / "e.npy"), "-o", str(inputs / "out.mp4")]
    r = CliRunner().invoke(app, base + flags, terminal_width=300)
    assert r.exit_code == 2, r.output
    assert fragment.format(dir=inputs) in " ".join(r.output.split())
    assert not list(inputs.glob(".*.tmp.mp4")) and not (inputs / "out.mp4").exists()


def test_bad_embedding_files_are_one_line_errors(tmp_path):
    (tmp_path / "notnumpy.txt").write_text("hello\n")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    for name, fragment in (("notnumpy.txt", "not a numeric .npy embedding"),
                           ("obj.npy", "not a numeric .npy embedding"),
                           ("str.npy", "expected a float array")):
        with pytest.raises(CosmosTrainError, match=fragment):
            load_embedding(str(tmp_path / name))


def test_input_without_a_video_stream_is_a_clear_error(tmp_path):
    with wave.open(str(tmp_path / "sound.mp4"), "wb") as w:  # audio only, whatever the name says
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(CosmosTrainError, match="has no video stream"):
        read_condition_frames(tmp_path / "sound.mp4", (16, 16), 1)
