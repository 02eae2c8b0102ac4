"""build_dataloader: exact resume, workers, validation split, weighted datasets, synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cosmos_train.data.loader import build_dataloader
from cosmos_train.data.synthetic import ensure_synthetic_dataset
from cosmos_train.data.video import read_frames
from cosmos_train.errors import CosmosTrainError
from cosmos_train.spec import DataSpec
from tests.data.media import make_dataset
from tests.dist import run_ranks


def _spec(**kw) -> DataSpec:
    base = dict(num_frames=9, video_size=(16, 16), batch_size=2, num_synthetic_clips=6)
    return DataSpec(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x["key"] == y["key"] and torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))


def test_resume_continues_with_the_same_batches(tmp_path):
    spec = _spec()
    loader = build_dataloader(spec, dp_rank=0, dp_size=1, seed=3, cache_dir=tmp_path)
    it = loader.batches()
    first = _take(it, 4)  # 3 steps per epoch: crosses into epoch 1
    batch = first[0]
    assert batch["video"].shape == (2, 3, 9, 16, 16) and batch["video"].dtype == torch.uint8
    assert batch["t5_text_embeddings"].shape == (2, 512, 1024) and batch["t5_text_mask"].dtype == torch.bool
    assert len(batch["caption"]) == 2
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 2}
    expected = _take(it, 4)

    resumed = build_dataloader(spec.model_copy(update={"num_workers": 2}), dp_rank=0, dp_size=1, seed=3,
                               cache_dir=tmp_path)
    resumed.load_state_dict(state)
    assert _same(_take(resumed.batches(), 4), expected)


def test_seed_changes_order_and_windows(tmp_path):
    keys = [b["key"] for b in build_dataloader(_spec(), dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path)]
    other = [b["key"] for b in build_dataloader(_spec(), dp_rank=0, dp_size=1, seed=1, cache_dir=tmp_path)]
    assert keys != other


def test_validation_split_holds_out_the_last_keys(tmp_path):
    spec = _spec(validation_clips=2, batch_size=1)
    train = build_dataloader(spec, dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path)
    val = build_dataloader(spec, dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path, split="val")
    assert val.dataset.keys == ["clip_0004", "clip_0005"] and len(train.dataset) == 4
    first, second = list(val), list(val)
    assert [b["key"] for b in first] == [["clip_0004"], ["clip_0005"]] and _same(first, second)
    with pytest.raises(CosmosTrainError, match="validation_clips"):
        build_dataloader(_spec(), dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path, split="val")
    with pytest.raises(CosmosTrainError, match="nothing to train"):
        build_dataloader(_spec(validation_clips=6), dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path)


def test_too_few_clips_for_one_step(tmp_path):
    with pytest.raises(CosmosTrainError, match="one step needs"):
        build_dataloader(_spec(), dp_rank=0, dp_size=4, seed=0, cache_dir=tmp_path)


def test_weighted_video_folders(tmp_path):
    a = make_dataset(tmp_path / "a", {f"a{i}": (9, 8, 8) for i in range(2)})
    b = make_dataset(tmp_path / "b", {f"b{i}": (9, 8, 8) for i in range(4)})
    spec = DataSpec(kind="video_folder", num_frames=9, video_size=(8, 8), batch_size=2,
                    datasets=[{"dataset_dir": str(a), "weight": 4.0}, {"dataset_dir": str(b), "weight": 1.0}])
    loader = build_dataloader(spec, dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path)
    it = loader.batches()
    keys = [k for _ in range(15) for k in next(it)["key"]]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.6 < share < 0.97 and any(k.startswith("b") for k in keys)


def test_synthetic_dataset_is_deterministic_and_reused(tmp_path):
    params = dict(num_clips=3, num_frames=9, video_size=(16, 24))
    one = ensure_synthetic_dataset(tmp_path / "x", **params)
    mtime = (one / "DONE").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "x", **params) == one
    assert (one / "DONE").stat().st_mtime_ns == mtime  # reused, not regenerated
    two = ensure_synthetic_dataset(tmp_path / "y", **params)
    assert one.name == two.name
    for key in ("clip_0000", "clip_0002"):
        fa = read_frames(one / "videos" / f"{key}.mp4", start=0, num_frames=9)
        fb = read_frames(two / "videos" / f"{key}.mp4", start=0, num_frames=9)
        assert np.array_equal(fa, fb) and fa.shape == (9, 16, 24, 3)
        assert (one / "metas" / f"{key}.txt").read_text() == (two / "metas" / f"{key}.txt").read_text()
    bigger = ensure_synthetic_dataset(tmp_path / "x", **{**params, "video_size": (32, 32)})
    assert bigger != one and (bigger / "DONE").is_file()


def _two_ranks_build(rank, world_size, cache_dir):
    # both ranks generate the synthetic data at once into the same cache
    loader = build_dataloader(_spec(batch_size=1), dp_rank=rank, dp_size=world_size, seed=0, cache_dir=cache_dir)
    keys = [k for b in loader for k in b["key"]]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, keys)
    return gathered


def test_two_ranks_generate_once_and_read_disjoint_clips(tmp_path):
    results = run_ranks(_two_ranks_build, 2, tmp_path, timeout=120)
    k0, k1 = results[0]
    assert results[0] == results[1] and len(k0) == len(k1) == 3 and not set(k0) & set(k1)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("synthetic-")  # no temporary dirs left
