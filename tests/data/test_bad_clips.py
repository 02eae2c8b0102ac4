"""A clip with corrupt packets: `data check --decode` finds it; training skips it with one warning
(or fails with data.bad_clips = "error"); the replacement is deterministic, so resume stays exact."""

from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

from cosmos_train.data.video import BadClipError, VideoFolderDataset, probe_video, read_frames
from tests.data.media import make_dataset
from tests.data.test_check_cli import _app


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 3
    raw[mid:mid + 64] = bytes(64)  # zeroed packet bytes: the container metadata stays intact
    path.write_bytes(raw)


@pytest.fixture
def bad_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", {f"c{i}": (13, 16, 16) for i in range(4)})
    _corrupt(root / "videos" / "c1.mp4")
    probe_video(root / "videos" / "c1.mp4")  # passes: only decoding reveals the damage
    with pytest.raises(BadClipError, match=r"c1\.mp4: cannot decode frame"):
        read_frames(root / "videos" / "c1.mp4", start=0, num_frames=13)
    return root


def test_data_check_decode_names_the_bad_clip(bad_dataset):
    r = CliRunner().invoke(_app(), ["data", "check", str(bad_dataset), "--num-frames", "13"], terminal_width=200)
    assert r.exit_code == 0, r.output  # metadata only: the damage is invisible
    r = CliRunner().invoke(_app(), ["data", "check", str(bad_dataset), "--num-frames", "13", "--decode"],
                           terminal_width=200)
    assert r.exit_code == 2, r.output
    assert "1 videos fail to decode" in r.output and "c1.mp4" in r.output


def test_training_skips_a_bad_clip_with_one_warning_deterministically(bad_dataset):
    def keys():
        ds = VideoFolderDataset(bad_dataset, num_frames=13, video_size=(16, 16))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = [ds[i]["key"] for i in (0, 1, 2, 3, 1, 1)]
        return got, [str(x.message) for x in w]

    got, warned = keys()
    assert got == ["c0", "c2", "c2", "c3", "c2", "c2"]  # c1 -> the next clip, with the same window seed
    assert len(warned) == 1 and "c1.mp4" in warned[0] and "skipping clip c1" in warned[0]
    assert keys()[0] == got  # a fresh dataset (a resumed run) makes the same choice


def test_bad_clips_error_fails_naming_the_clip(bad_dataset):
    ds = VideoFolderDataset(bad_dataset, num_frames=13, video_size=(16, 16), bad_clips="error")
    assert ds[0]["key"] == "c0"
    with pytest.raises(BadClipError, match=r"(?s)c1\.mp4: cannot decode frame .*data\.bad_clips = \"skip\""):
        ds[1]
