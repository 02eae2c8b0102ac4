"""VideoFolderDataset on real mp4 files: windows, short clips, resizing, layout errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cosmos_train.data.sampler import SampleRef
from cosmos_train.data.video import VideoFolderDataset, probe_video, resize_video
from cosmos_train.errors import CosmosTrainError
from tests.data.media import make_dataset


def _frame_ids(video: torch.Tensor, seed: int) -> list[int]:
    # channel 0 of source frame t is 10 * t + seed everywhere (see media.ramp_frames)
    return [(int(v) - seed) // 10 for v in video[0, :, 0, 0]]


def test_clip_with_exactly_num_frames_is_valid(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 16, 16)})
    assert probe_video(root / "videos" / "a.mp4").frames == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = VideoFolderDataset(root, num_frames=9, video_size=(16, 16))
    item = ds[SampleRef(0, 123)]
    assert item["video"].dtype == torch.uint8 and item["video"].shape == (3, 9, 16, 16)
    assert _frame_ids(item["video"], 0) == list(range(9))
    assert item["t5_text_embeddings"].dtype == torch.float32 and item["t5_text_embeddings"].shape == (512, 1024)
    assert item["t5_text_mask"].dtype == torch.bool and int(item["t5_text_mask"].sum()) == 5
    assert item["caption"] == "caption of a" and item["key"] == "a"


def test_short_clips_skipped_with_one_warning(tmp_path):
    root = make_dataset(tmp_path, {"long": (13, 8, 8), "short1": (5, 8, 8), "short2": (8, 8, 8)})
    with pytest.warns(UserWarning) as record:
        ds = VideoFolderDataset(root, num_frames=9, video_size=(8, 8))
    assert len(record) == 1
    msg = str(record[0].message)
    assert "short1 (5 frames)" in msg and "short2 (8 frames)" in msg and "4k+1" in msg
    assert ds.keys == ["long"]


def test_short_clips_error_mode_explains_the_rule(tmp_path):
    root = make_dataset(tmp_path, {"long": (13, 8, 8), "short": (5, 8, 8)})
    with pytest.raises(CosmosTrainError, match=r"4k\+1") as exc:
        VideoFolderDataset(root, num_frames=9, video_size=(8, 8), short_clips="error")
    assert "short (5 frames)" in str(exc.value) and "num_frames = 9" in str(exc.value)


def test_odd_sizes_are_resized(tmp_path):
    root = make_dataset(tmp_path, {"odd": (9, 33, 47)})
    assert (probe_video(root / "videos" / "odd.mp4").height, probe_video(root / "videos" / "odd.mp4").width) == (33, 47)
    item = VideoFolderDataset(root, num_frames=9, video_size=(16, 24))[0]
    assert item["video"].shape == (3, 9, 16, 24) and item["video"].dtype == torch.uint8
    # channel 0 is constant per frame, so resizing must keep it exactly
    assert torch.equal(item["video"][0], torch.arange(9, dtype=torch.uint8)[:, None, None].expand(9, 16, 24) * 10)


def test_resize_matches_float_interpolation():
    video = torch.randint(0, 256, (3, 2, 9, 11), dtype=torch.uint8)
    out = resize_video(video, (4, 6))
    ref = torch.nn.functional.interpolate(video.permute(1, 0, 2, 3).float(), size=(4, 6), mode="bilinear",
                                          antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, ref.permute(1, 0, 2, 3))
    assert resize_video(video, (9, 11)) is video


def test_windows_are_deterministic_contiguous_and_cover_all_starts(tmp_path):
    root = make_dataset(tmp_path, {"clip": (17, 8, 8)})
    ds = VideoFolderDataset(root, num_frames=9, video_size=(8, 8))
    starts = set()
    for seed in range(40):
        a, b = ds[SampleRef(0, seed)], ds[SampleRef(0, seed)]
        assert torch.equal(a["video"], b["video"])
        ids = _frame_ids(a["video"], 0)
        assert ids == list(range(ids[0], ids[0] + 9))
        starts.add(ids[0])
    assert starts == set(range(0, 9))  # 17 - 9 + 1 possible starts


def test_layout_problems_are_clear_errors(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 8, 8)})
    (root / "metas" / "lonely.txt").write_text("no video\n")
    with pytest.raises(CosmosTrainError, match="captions without a video.*lonely"):
        VideoFolderDataset(root, num_frames=9, video_size=(8, 8))


def test_missing_store_hints_the_converter(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 8, 8)})
    import shutil
    shutil.rmtree(root / "t5_xxl.zarr")
    (root / "t5_xxl").mkdir()
    (root / "t5_xxl" / "a.pickle").write_bytes(b"")
    with pytest.raises(CosmosTrainError, match="convert-embeddings"):
        VideoFolderDataset(root, num_frames=9, video_size=(8, 8))


def test_ramp_source_is_lossless(tmp_path):
    # The tests above rely on exact frame values: the writer must be lossless.
    from cosmos_train.data.video import read_frames
    from tests.data.media import ramp_frames
    root = make_dataset(tmp_path, {"a": (5, 7, 9)})
    assert np.array_equal(read_frames(root / "videos" / "a.mp4", start=0, num_frames=5), ramp_frames(5, 7, 9, seed=0))
